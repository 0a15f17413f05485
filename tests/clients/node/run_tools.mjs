// chat.completions.runTools: the SDK's tool loop. The model is made to call the named function
// (a forced call), the SDK runs it and sends its result back, and the loop ends.
import { run } from './lib.mjs';

await run(async (openai, { model }) => {
  const ran = [];
  const runner = openai.chat.completions.runTools({
    model,
    messages: [{ role: 'user', content: 'What is the weather in Paris?' }],
    max_tokens: 64,
    tool_choice: { type: 'function', function: { name: 'get_weather' } },
    tools: [
      {
        type: 'function',
        function: {
          name: 'get_weather',
          parameters: {
            type: 'object',
            properties: { city: { type: 'string', enum: ['Paris', 'Rome'] } },
            required: ['city'],
          },
          parse: JSON.parse,
          function: (args) => {
            ran.push(args);
            return { city: args.city, sky: 'sunny' };
          },
        },
      },
    ],
  });
  const roles = [];
  const calls = [];
  runner.on('message', (message) => {
    roles.push(message.role);
    for (const call of message.tool_calls ?? []) calls.push(call.function.name);
  });
  await runner.done();
  return { ran, roles, calls };
});
