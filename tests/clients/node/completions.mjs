// completions.create (the legacy text completions endpoint).
import { run } from './lib.mjs';

await run(async (openai, { model }) => {
  const completion = await openai.completions.create({ model, prompt: 'Once upon a time', max_tokens: 4 });
  const [choice] = completion.choices;
  return {
    id: completion.id,
    object: completion.object,
    model: completion.model,
    choices: completion.choices.length,
    text: choice.text,
    finish_reason: choice.finish_reason,
    usage: completion.usage ?? null,
  };
});
