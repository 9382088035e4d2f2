// /metrics: vLLM's metric names, types, labels and buckets, and values equal to what the clients
// saw; one Registry per app (two servers in one process keep their own counts).
import t from 'tap';
import OpenAI from 'openai';
import {
  build125Buckets, ITERATION_TOKENS_BUCKETS, PREPROCESS_BUCKETS, REQUEST_LATENCY_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS,
} from '../src/metrics/metrics.js';
import { parseProm, scrape } from './helpers/prom.js';
import { pngDataUri, startTestServer, waitFor } from './helpers/server.js';

const L = { model_name: 'caprl', engine: '0' };

t.test('build125Buckets is vLLM build_1_2_5_buckets', async (t) => {
  t.same(build125Buckets(100), [1, 2, 5, 10, 20, 50, 100]);
  t.same(build125Buckets(1024), [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]);
  t.same(build125Buckets(1), [1]);
});

t.test('parseProm reads labels with escapes', async (t) => {
  const s = parseProm('# TYPE a counter\na{x="q\\"z",y="2"} 3\nb 4.5\n');
  t.equal(s.value('a', { y: '2' }), 3);
  t.equal(s.value('b'), 4.5);
  t.equal(s.types.get('a'), 'counter');
});

t.test('metrics on the tiny model', async (t) => {
  const s = await startTestServer({ engine: { nThreads: 1, maxModelLen: 4000 } });
  t.teardown(() => s.close());
  const other = await startTestServer({ engine: { nThreads: 1, maxModelLen: 512 }, server: { servedModelNames: ['other'] } });
  t.teardown(() => other.close());
  // Warm up the engine (the first decode is slow) before anything is timed.
  await s.client.chat.completions.create({ model: 'caprl', messages: [{ role: 'user', content: 'warm up' }], max_tokens: 2 });
  const base = await scrape(s.url);

  t.test('names, types, labels and vLLM bucket boundaries', async (t) => {
    const m = await scrape(s.url);
    const expected: [string, string][] = [
      ['vllm:num_requests_running', 'gauge'],
      ['vllm:num_requests_waiting', 'gauge'],
      ['vllm:kv_cache_usage_perc', 'gauge'],
      ['vllm:gpu_cache_usage_perc', 'gauge'],
      ['vllm:prompt_tokens_total', 'counter'],
      ['vllm:generation_tokens_total', 'counter'],
      ['vllm:num_preemptions_total', 'counter'],
      ['vllm:request_success_total', 'counter'],
      ['vllm:time_to_first_token_seconds', 'histogram'],
      ['vllm:inter_token_latency_seconds', 'histogram'],
      ['vllm:time_per_output_token_seconds', 'histogram'],
      ['vllm:request_time_per_output_token_seconds', 'histogram'],
      ['vllm:e2e_request_latency_seconds', 'histogram'],
      ['vllm:request_queue_time_seconds', 'histogram'],
      ['vllm:request_prefill_time_seconds', 'histogram'],
      ['vllm:request_decode_time_seconds', 'histogram'],
      ['vllm:request_inference_time_seconds', 'histogram'],
      ['vllm:iteration_tokens_total', 'histogram'],
      ['caprl:image_encode_seconds', 'histogram'],
      ['vllm:request_prompt_tokens', 'histogram'],
      ['vllm:request_generation_tokens', 'histogram'],
      ['vllm:request_params_max_tokens', 'histogram'],
      ['vllm:request_params_n', 'histogram'],
      ['caprl:images_received_total', 'counter'],
      ['caprl:request_preprocessing_seconds', 'histogram'],
      ['caprl:engine_steps_total', 'counter'],
      ['caprl:engine_step_sequences_total', 'counter'],
      ['caprl:kv_stream_moves_total', 'counter'],
      ['caprl:engine_busy_seconds_total', 'counter'],
      ['caprl:engine_model_seconds_total', 'counter'],
      ['caprl:engine_sample_seconds_total', 'counter'],
      ['caprl:engine_cpu_wait_seconds_total', 'counter'],
      ['caprl:image_cache_hits_total', 'counter'],
      ['caprl:image_cache_misses_total', 'counter'],
      ['caprl:requests_rejected_total', 'counter'],
      ['caprl:request_timeouts_total', 'counter'],
      ['http_requests_total', 'counter'],
    ];
    for (const [name, type] of expected) t.equal(m.types.get(name), type, `${name} is a ${type}`);
    for (const name of ['vllm:num_requests_running', 'vllm:prompt_tokens_total', 'vllm:e2e_request_latency_seconds_count']) {
      t.ok(m.samples.some((x) => x.name === name && x.labels.model_name === 'caprl' && x.labels.engine === '0'), `${name}{model_name="caprl",engine="0"}`);
    }
    for (const reason of ['stop', 'length', 'abort']) {
      t.ok(m.samples.some((x) => x.name === 'vllm:request_success_total' && x.labels.finished_reason === reason), `finished_reason="${reason}" present from the start`);
    }
    t.same(m.buckets('vllm:time_to_first_token_seconds'), TTFT_BUCKETS);
    t.same(m.buckets('vllm:inter_token_latency_seconds'), TPOT_BUCKETS);
    t.same(m.buckets('vllm:time_per_output_token_seconds'), TPOT_BUCKETS);
    t.same(m.buckets('vllm:e2e_request_latency_seconds'), REQUEST_LATENCY_BUCKETS);
    for (const name of ['queue', 'prefill', 'decode', 'inference']) {
      t.same(m.buckets(`vllm:request_${name}_time_seconds`), REQUEST_LATENCY_BUCKETS, `${name} time buckets`);
    }
    t.same(m.buckets('vllm:iteration_tokens_total'), ITERATION_TOKENS_BUCKETS);
    t.same(ITERATION_TOKENS_BUCKETS, [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]);
    t.same(m.buckets('caprl:image_encode_seconds'), PREPROCESS_BUCKETS);
    t.ok(m.samples.some((x) => x.name === 'vllm:iteration_tokens_total_count' && x.labels.model_name === 'caprl' && x.labels.engine === '0'), 'iteration tokens labelled');
    t.same(m.buckets('vllm:request_prompt_tokens'), build125Buckets(4000), 'token buckets up to max_model_len');
    t.same(TTFT_BUCKETS.length, 22);
    t.same(TPOT_BUCKETS.length, 19);
    t.same(REQUEST_LATENCY_BUCKETS.length, 21);
    // Node process metrics.
    for (const name of ['process_resident_memory_bytes', 'nodejs_heap_size_used_bytes', 'nodejs_eventloop_lag_seconds']) t.ok(m.has(name), name);
    t.equal(m.value('caprl:kv_cache_total_tokens', L), 4096);
    t.equal(m.value('vllm:num_preemptions_total', L), s.engine.stats().preemptions);
    t.equal(m.value('caprl:kv_stream_moves_total', L), s.engine.stats().streamMoves);
  });

  t.test('counts equal what the clients saw', async (t) => {
    const image = await pngDataUri(112, 112);
    const N = 4;
    const MAX = 6;
    const results: OpenAI.ChatCompletion[] = [];
    for (let i = 0; i < N; i++) {
      const content: OpenAI.ChatCompletionContentPart[] = i % 2 === 0
        ? [{ type: 'image_url', image_url: { url: image } }, { type: 'text', text: `Caption ${i}` }]
        : [{ type: 'text', text: `Say something ${i}` }];
      results.push(await s.client.chat.completions.create({
        model: 'caprl', messages: [{ role: 'user', content }], max_tokens: MAX, temperature: 0, ignore_eos: true,
      } as OpenAI.ChatCompletionCreateParamsNonStreaming));
    }
    // One streamed.
    const stream = await s.client.chat.completions.create({
      model: 'caprl', messages: [{ role: 'user', content: 'streamed' }], max_tokens: MAX, temperature: 0, ignore_eos: true,
      stream: true, stream_options: { include_usage: true },
    } as OpenAI.ChatCompletionCreateParamsStreaming);
    let streamUsage: OpenAI.CompletionUsage | undefined;
    for await (const ch of stream) if (ch.usage) streamUsage = ch.usage;
    const usages = [...results.map((r) => r.usage!), streamUsage!];
    const prompt = usages.reduce((a, u) => a + u.prompt_tokens, 0);
    const completion = usages.reduce((a, u) => a + u.completion_tokens, 0);
    t.equal(completion, (N + 1) * MAX);
    // A bad request: counted by HTTP status only.
    await fetch(`${s.baseURL}/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"messages": 5}' });

    const m = await scrape(s.url);
    const d = (name: string, labels: Record<string, string> = L) => m.value(name, labels) - base.value(name, labels);
    const e2eSum = () => d('vllm:e2e_request_latency_seconds_sum');
    t.equal(d('vllm:request_success_total', { ...L, finished_reason: 'length' }), N + 1);
    t.equal(d('vllm:request_success_total', { ...L, finished_reason: 'abort' }), 0);
    t.equal(d('vllm:prompt_tokens_total'), prompt, 'prompt tokens = sum of usage.prompt_tokens');
    t.equal(d('vllm:generation_tokens_total'), completion, 'generation tokens = sum of usage.completion_tokens');
    t.equal(d('vllm:request_prompt_tokens_sum'), prompt);
    t.equal(d('vllm:request_generation_tokens_sum'), completion);
    t.equal(d('vllm:request_prompt_tokens_count'), N + 1);
    t.equal(d('vllm:e2e_request_latency_seconds_count'), N + 1);
    t.equal(d('vllm:time_to_first_token_seconds_count'), N + 1);
    t.equal(d('vllm:inter_token_latency_seconds_count'), completion - (N + 1), 'one inter-token gap per token after the first');
    t.equal(d('vllm:time_per_output_token_seconds_count'), completion - (N + 1));
    t.equal(d('vllm:request_params_max_tokens_sum'), (N + 1) * MAX);
    t.equal(d('vllm:request_params_n_count'), N + 1);
    t.equal(d('caprl:images_received_total'), N / 2);
    t.equal(d('caprl:image_cache_hits_total') + d('caprl:image_cache_misses_total'), N / 2, 'every image is an embedding-cache hit or a miss');
    t.equal(d('caprl:request_preprocessing_seconds_count'), N + 1);
    t.ok(d('caprl:engine_steps_total') >= MAX, 'engine steps advanced');
    t.ok(d('caprl:engine_step_sequences_total') >= completion - (N + 1), 'decoded sequences advanced');
    const [busy, model, sample] = ['busy', 'model', 'sample'].map((k) => d(`caprl:engine_${k}_seconds_total`));
    t.ok(model > 0 && sample > 0 && model + sample <= busy && busy < e2eSum(),
      `engine time: model ${model.toFixed(4)} s + sample ${sample.toFixed(4)} s <= busy ${busy.toFixed(4)} s < the requests' e2e sum`);
    const ttft = d('vllm:time_to_first_token_seconds_sum');
    const e2e = d('vllm:e2e_request_latency_seconds_sum');
    t.ok(ttft > 0 && ttft < e2e, `0 < TTFT sum (${ttft}) < e2e sum (${e2e})`);
    t.ok(d('vllm:request_decode_time_seconds_sum') < e2e);
    const http = (status: string) => m.value('http_requests_total', { handler: '/v1/chat/completions', status }) -
      base.value('http_requests_total', { handler: '/v1/chat/completions', status });
    t.equal(http('2xx'), N + 1);
    t.equal(http('4xx'), 1);
    t.equal(m.value('vllm:num_requests_running', L), 0);
    t.equal(m.value('vllm:kv_cache_usage_perc', L), 0);

    // The other server's registry saw none of it.
    const o = await scrape(other.url);
    t.equal(o.value('vllm:request_success_total', { model_name: 'other' }), 0);
    t.equal(o.value('vllm:request_success_total', { model_name: 'caprl' }), 0, 'no caprl series in the other registry');
    t.equal(o.value('vllm:prompt_tokens_total'), 0);
  });

  t.test('engine phase times, tokens per step and image encode time', async (t) => {
    const image = await pngDataUri(168, 112); // not sent before: its first encode is a cache miss
    const MAX = 5;
    const ask = (content: OpenAI.ChatCompletionMessageParam['content'], n = 1) => s.client.chat.completions.create({
      model: 'caprl', messages: [{ role: 'user', content } as OpenAI.ChatCompletionUserMessageParam], max_tokens: MAX, temperature: 0, ignore_eos: true, n,
    } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    const before = await scrape(s.url);
    const replies = await Promise.all([
      ask('Text only, one choice'),
      ask('Text only, two choices', 2),
      ask([{ type: 'image_url', image_url: { url: image } }, { type: 'text', text: 'Caption this' }]),
    ]);
    const m = await scrape(s.url);
    const d = (name: string, from = before, to = m) => to.value(name, L) - from.value(name, L);
    const choices = replies.reduce((a, r) => a + r.choices.length, 0);
    t.equal(choices, 4);

    for (const phase of ['queue', 'prefill', 'decode', 'inference']) {
      t.equal(d(`vllm:request_${phase}_time_seconds_count`), choices, `${phase}: one observation per choice`);
    }
    const [queue, prefill, decode, inference, e2e] = ['queue', 'prefill', 'decode', 'inference', 'e2e']
      .map((p) => d(p === 'e2e' ? 'vllm:e2e_request_latency_seconds_sum' : `vllm:request_${p}_time_seconds_sum`));
    t.ok(prefill! > 0 && decode! > 0 && queue! >= 0, `prefill ${prefill}, decode ${decode}, queue ${queue}`);
    t.ok(Math.abs(inference! - (prefill! + decode!)) < 1e-6, 'inference = prefill + decode');
    t.ok(queue! + prefill! + decode! <= e2e! + 1e-6, `queue + prefill + decode (${queue! + prefill! + decode!}) within e2e (${e2e})`);

    // Every prompt is decoded once (image rows included) and every sampled token but a choice's last.
    const tokens = d('vllm:prompt_tokens_total') + d('vllm:generation_tokens_total') - choices;
    t.equal(d('vllm:iteration_tokens_total_sum'), tokens, 'tokens over the steps = prompts + decoded outputs');
    t.ok(d('vllm:iteration_tokens_total_count') >= d('caprl:engine_steps_total'), 'every decode step observed');
    t.equal(m.value('vllm:iteration_tokens_total_bucket', { ...L, le: '+Inf' }), m.value('vllm:iteration_tokens_total_count', L));

    t.equal(d('caprl:image_encode_seconds_count'), 1, 'only the request with an image observes an encode time');
    t.ok(d('caprl:image_encode_seconds_sum') > 0, 'a first-seen image takes encoder time');
    // The same image again comes from the embedding cache: observed, with no encoder time.
    await ask([{ type: 'image_url', image_url: { url: image } }, { type: 'text', text: 'Caption this again' }]);
    const again = await scrape(s.url);
    t.equal(d('caprl:image_cache_hits_total', m, again), 1);
    t.equal(d('caprl:image_encode_seconds_count', m, again), 1);
    t.equal(d('caprl:image_encode_seconds_sum', m, again), 0, 'a cache hit takes no encoder time');
  });

  t.test('running requests, KV cache usage and aborts while a request runs', async (t) => {
    const before = await scrape(s.url);
    const ac = new AbortController();
    const res = await fetch(`${s.baseURL}/chat/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, signal: ac.signal,
      body: JSON.stringify({ model: 'caprl', messages: [{ role: 'user', content: 'Go on.' }], max_tokens: 3900, ignore_eos: true, stream: true }),
    });
    const reader = res.body!.getReader();
    await reader.read(); // the role chunk, sent before the engine starts
    await reader.read(); // generated text: the engine runs it
    const m = await scrape(s.url);
    t.equal(m.value('vllm:num_requests_running', L), 1);
    t.ok(m.value('vllm:kv_cache_usage_perc', L) > 0, 'KV cells in use');
    t.ok(m.value('caprl:kv_cache_used_tokens', L) > 0);
    ac.abort();
    t.ok(await waitFor(() => s.engine.liveCount === 0, 5000));
    // The observer records the abort as the handler reads it: poll the scrape.
    let after = await scrape(s.url);
    for (let i = 0; i < 50 && after.value('vllm:request_success_total', { ...L, finished_reason: 'abort' }) === before.value('vllm:request_success_total', { ...L, finished_reason: 'abort' }); i++) {
      await new Promise((r) => setTimeout(r, 20));
      after = await scrape(s.url);
    }
    t.equal(after.value('vllm:request_success_total', { ...L, finished_reason: 'abort' }) -
      before.value('vllm:request_success_total', { ...L, finished_reason: 'abort' }), 1, 'the disconnect counts as finished_reason="abort"');
    t.equal(after.value('vllm:num_requests_running', L), 0);
    t.equal(after.value('vllm:kv_cache_usage_perc', L), 0, 'KV cells freed');
  });

  t.test('/metrics is open text/plain in the exposition format', async (t) => {
    const res = await fetch(`${s.url}/metrics`);
    t.equal(res.status, 200);
    t.match(res.headers.get('content-type'), /^text\/plain; version=0\.0\.4/);
  });
});
