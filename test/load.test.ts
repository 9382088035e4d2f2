// A loopback load test on the tiny model: many clients at once, some hanging up mid-stream, some
// sending broken requests, more than the server holds (so some are refused with 429). Every
// request is answered or refused and none is lost; /metrics counts equal what the clients saw;
// afterwards nothing runs, no KV cell is held, and RSS is back near where it started.
import t from 'tap';
import v8 from 'node:v8';
import vm from 'node:vm';
import { accounted, DISCONNECT_PROMPT, runLoad } from '../bench/load.js';
import { picture, dataUri } from './helpers/bad-images.js';
import { scrape, type Scrape } from './helpers/prom.js';
import { startTestServer, waitFor } from './helpers/server.js';

const L = { model_name: 'caprl', engine: '0' };
const REQUESTS = Number(process.env.CAPRL_LOAD_REQUESTS ?? 400);

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;
const settledRss = async (): Promise<number> => {
  for (let i = 0; i < 3; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 100));
  }
  return process.memoryUsage().rss;
};

t.test('loopback load: every request answered or refused, metrics equal what clients saw, memory comes back', async (t) => {
  const s = await startTestServer({
    engine: { nThreads: 1, maxModelLen: 512, maxSeqs: 4, nCtx: 4096 },
    server: { maxNumSeqs: 4, operations: { maxNumSeqs: 4, maxWaitingRequests: 2 } },
  });
  t.teardown(() => s.close());
  const images = await Promise.all([[224, 224], [320, 240], [120, 200]].map(async ([w, h]) => dataUri(await picture(w!, h!).jpeg().toBuffer(), 'image/jpeg')));
  const clients = 24;

  // Warm-up (first decodes are slow; allocator pools fill), then the prompt size of a disconnecting request.
  await runLoad({ baseUrl: s.url, model: 'caprl', clients: 4, requests: 24, images, seed: 99, mix: { disconnect: 0, bad: 0 } });
  const calib = await s.client.chat.completions.create({ model: 'caprl', messages: [{ role: 'user', content: DISCONNECT_PROMPT }], max_tokens: 1 });
  const disconnectPrompt = calib.usage!.prompt_tokens;
  const rss0 = await settledRss();
  const before = await scrape(s.url);

  const tally = await runLoad({
    baseUrl: s.url, model: 'caprl', clients, requests: REQUESTS, images, seed: 7, outputTokens: 8, disconnectTokens: 400, refusedBackoffMs: 400,
  });
  const o = tally.byOutcome;
  t.comment(`${tally.sent} requests in ${(tally.elapsedMs / 1000).toFixed(1)} s: ${JSON.stringify(o)}; kinds ${JSON.stringify(tally.byKind)}`);
  t.same(tally.errors, [], 'no errors');
  t.equal(tally.sent, REQUESTS);
  t.equal(accounted(tally), tally.sent, 'every request answered, refused or hung up on: none lost');
  t.ok(o.ok >= 20, `requests succeed under load (${o.ok})`);
  t.ok(o.disconnected > 0 && o.rejected > 0, 'some clients hung up, some requests were broken');
  t.ok(o.refused > 0, `with ${clients} clients and room for 6, some were refused with 429 (${o.refused})`);

  // Nothing left behind.
  t.ok(await waitFor(() => s.engine.liveCount === 0 && s.engine.stats().kvUsedCells === 0, 10_000), 'no generation left, KV cells free');
  let m: Scrape = await scrape(s.url);
  const d = (name: string, labels: Record<string, string> = L) => m.value(name, labels) - before.value(name, labels);
  for (let i = 0; i < 50 && d('vllm:e2e_request_latency_seconds_count') < o.ok + o.disconnected; i++) {
    await new Promise((r) => setTimeout(r, 50));
    m = await scrape(s.url);
  }

  // Metrics equal what the clients saw.
  // A client that hangs up right after the engine finished its generation is a success to the server
  // (as in vLLM): the two classes may trade such a request, but together they account for every one.
  const successes = d('vllm:request_success_total', { ...L, finished_reason: 'length' }) + d('vllm:request_success_total', { ...L, finished_reason: 'stop' });
  const aborts = d('vllm:request_success_total', { ...L, finished_reason: 'abort' });
  t.equal(successes + aborts, o.ok + o.disconnected, 'successes + aborts = what the clients completed or hung up on');
  t.ok(successes >= o.ok, `every request a client saw complete is a success (${successes} >= ${o.ok})`);
  t.ok(aborts > 0 && aborts <= o.disconnected, `aborts come from clients that hung up (${aborts} of ${o.disconnected})`);
  t.equal(d('vllm:request_success_total', { ...L, finished_reason: 'error' }), 0);
  t.equal(d('vllm:e2e_request_latency_seconds_count'), o.ok + o.disconnected);
  t.equal(d('vllm:time_to_first_token_seconds_count'), o.ok + o.disconnected, 'every one that reached the engine got a first token');
  t.equal(d('vllm:prompt_tokens_total'), tally.promptTokens + o.disconnected * disconnectPrompt, 'prompt tokens');
  t.equal(d('vllm:request_prompt_tokens_sum'), d('vllm:prompt_tokens_total'));
  t.equal(d('vllm:generation_tokens_total'), d('vllm:request_generation_tokens_sum'), 'generation tokens: engine total = sum over requests');
  t.ok(d('vllm:generation_tokens_total') >= tally.completionTokens + o.disconnected, 'generation tokens cover what clients received');
  t.equal(d('caprl:requests_rejected_total', { ...L, reason: 'queue_full' }), o.refused, '429s');
  t.equal(d('http_requests_total', { handler: '/v1/chat/completions', status: '4xx' }, ), o.refused + o.rejected, '4xx = refused + broken');
  t.equal(d('http_requests_total', { handler: '/v1/chat/completions', status: '2xx' }), o.ok + o.disconnected, '2xx = answered + hung up mid-stream');
  t.equal(d('http_requests_total', { handler: '/v1/chat/completions', status: '5xx' }), 0);
  t.equal(m.value('vllm:num_requests_running', L), 0);
  t.equal(m.value('vllm:num_requests_waiting', L), 0);
  t.equal(m.value('vllm:kv_cache_usage_perc', L), 0);
  t.equal(m.value('caprl:num_requests_preprocessing', L), 0);

  // Memory back near its baseline.
  const rss1 = await settledRss();
  const grown = (rss1 - rss0) / 2 ** 20;
  t.comment(`RSS before ${(rss0 / 2 ** 20).toFixed(0)} MiB, after ${(rss1 / 2 ** 20).toFixed(0)} MiB (${grown >= 0 ? '+' : ''}${grown.toFixed(0)} MiB)`);
  t.ok(grown < 96, `RSS back near its baseline (+${grown.toFixed(0)} MiB)`);
  t.equal((await fetch(`${s.url}/health`)).status, 200);
});
