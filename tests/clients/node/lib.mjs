// What every check shares: the client from argv or env, and one JSON summary line on stdout.
//   node <check>.mjs --base-url http://host:port/v1 --api-key lp_... --model tiny-llama:my-adapter
// or OPENAI_BASE_URL, OPENAI_API_KEY and OPENAI_MODEL. Exit status 0 when the check ran (the
// summary says what came back), 1 when the client threw where it should not (the summary says what).
import { parseArgs } from 'node:util';
import OpenAI from 'openai';
import { VERSION } from 'openai/version';

export function options() {
  const { values } = parseArgs({
    options: {
      'base-url': { type: 'string' },
      'api-key': { type: 'string' },
      model: { type: 'string' },
    },
  });
  const baseURL = values['base-url'] ?? process.env.OPENAI_BASE_URL;
  const apiKey = values['api-key'] ?? process.env.OPENAI_API_KEY;
  const model = values.model ?? process.env.OPENAI_MODEL;
  if (!baseURL || !apiKey || !model) {
    console.error('usage: node <check>.mjs --base-url URL --api-key KEY --model MODEL');
    console.error('       (or OPENAI_BASE_URL, OPENAI_API_KEY, OPENAI_MODEL)');
    process.exit(2);
  }
  return { baseURL, apiKey, model };
}

export function client(opts, overrides = {}) {
  return new OpenAI({ baseURL: opts.baseURL, apiKey: opts.apiKey, maxRetries: 0, timeout: 20_000, ...overrides });
}

// An error as the test asserts on it: the SDK's class, and what the API said.
export function described(err) {
  return {
    class: err?.constructor?.name ?? typeof err,
    status: err?.status ?? null,
    message: String(err?.message ?? err),
    type: err?.type ?? null,
    code: err?.code ?? null,
    param: err?.param ?? null,
    isAPIError: err instanceof OpenAI.APIError,
  };
}

// Runs `check(client, opts)` and prints {ok, sdk, node, ...its summary} or {ok: false, error}.
export async function run(check) {
  const opts = options();
  const head = { sdk: VERSION, node: process.versions.node };
  try {
    const summary = await check(client(opts), opts);
    process.stdout.write(JSON.stringify({ ok: true, ...head, ...summary }) + '\n');
  } catch (err) {
    process.stdout.write(JSON.stringify({ ok: false, ...head, error: described(err) }) + '\n');
    process.exitCode = 1;
  }
}
