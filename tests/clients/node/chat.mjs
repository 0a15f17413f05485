// chat.completions.create, not streamed.
import { run } from './lib.mjs';

await run(async (openai, { model }) => {
  const completion = await openai.chat.completions.create({
    model,
    messages: [{ role: 'user', content: 'Say hello.' }],
    max_tokens: 5,
  });
  const [choice] = completion.choices;
  return {
    id: completion.id,
    object: completion.object,
    model: completion.model,
    choices: completion.choices.length,
    role: choice.message.role,
    content: choice.message.content,
    finish_reason: choice.finish_reason,
    usage: completion.usage ?? null,
  };
});
