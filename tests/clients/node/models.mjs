// models.list, read with the SDK's auto-pagination (for await over the page's items).
import { run } from './lib.mjs';

await run(async (openai) => {
  const models = [];
  for await (const model of openai.models.list()) {
    models.push({ id: model.id, object: model.object, owned_by: model.owned_by, created: model.created });
  }
  return { ids: models.map((m) => m.id), models };
});
