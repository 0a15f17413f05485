// embeddings.create as the SDK sends it by default (it asks for base64 and decodes it to floats),
// and with encoding_format: 'float'.
import { run } from './lib.mjs';

await run(async (openai, { model }) => {
  const input = ['a', 'hello world'];
  const summary = {};
  for (const [name, extra] of [['default', {}], ['float', { encoding_format: 'float' }]]) {
    const response = await openai.embeddings.create({ model, input, ...extra });
    summary[name] = {
      object: response.object,
      model: response.model,
      indexes: response.data.map((d) => d.index),
      embeddings: response.data.map((d) => Array.from(d.embedding)),
      usage: response.usage ?? null,
    };
  }
  return summary;
});
