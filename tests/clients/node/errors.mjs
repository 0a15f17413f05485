// Errors as the SDK's classes: an unknown model (NotFoundError, 404), a bad max_tokens
// (BadRequestError, 400), a wrong key (AuthenticationError, 401). --model: a chat model the key may use.
import OpenAI from 'openai';
import { client, described, run } from './lib.mjs';

async function thrown(request) {
  try {
    await request();
  } catch (err) {
    return {
      ...described(err),
      isNotFoundError: err instanceof OpenAI.NotFoundError,
      isBadRequestError: err instanceof OpenAI.BadRequestError,
      isAuthenticationError: err instanceof OpenAI.AuthenticationError,
    };
  }
  return null; // nothing thrown
}

await run(async (openai, opts) => {
  const messages = [{ role: 'user', content: 'hi' }];
  return {
    unknown_adapter: await thrown(() =>
      openai.chat.completions.create({ model: `${opts.model.split(':')[0]}:no-such-adapter`, messages }),
    ),
    unknown_base_model: await thrown(() => openai.chat.completions.create({ model: 'gpt-17', messages })),
    bad_max_tokens: await thrown(() => openai.chat.completions.create({ model: opts.model, messages, max_tokens: -1 })),
    wrong_key: await thrown(() =>
      client(opts, { apiKey: 'lp_not-a-key' }).chat.completions.create({ model: opts.model, messages }),
    ),
  };
});
