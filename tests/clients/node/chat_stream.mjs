// chat.completions.create with stream: true, read with for await.
import { run } from './lib.mjs';

await run(async (openai, { model }) => {
  const stream = await openai.chat.completions.create({
    model,
    messages: [{ role: 'user', content: 'Count to five.' }],
    max_tokens: 5,
    stream: true,
  });
  let chunks = 0;
  let content = '';
  let finish_reason = null;
  const ids = new Set();
  const models = new Set();
  const objects = new Set();
  for await (const chunk of stream) {
    chunks += 1;
    ids.add(chunk.id);
    models.add(chunk.model);
    objects.add(chunk.object);
    for (const choice of chunk.choices) {
      content += choice.delta?.content ?? '';
      finish_reason = choice.finish_reason ?? finish_reason;
    }
  }
  return { chunks, content, finish_reason, ids: [...ids], models: [...models], objects: [...objects] };
});
