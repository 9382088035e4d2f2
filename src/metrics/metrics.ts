// Prometheus metrics for one server (one app, one engine), in a Registry of its own so several
// servers can live in one process (the tests do). Names, types, labels and bucket boundaries are
// vLLM V1's (vllm/v1/metrics/loggers.py), so a vLLM Grafana dashboard works unchanged; ours are
// under `caprl:`; Node's process metrics come from prom-client's collectDefaultMetrics.
//
// Where each value comes from:
//   engine state (running, waiting, KV cache, token totals, steps, tokens per step, image cache):
//     Engine.stats(), read at scrape time;
//   queue, prefill, decode, inference and image-encode times: the engine thread's clock, carried
//     on each choice's finish (EngineTimings);
//   the other per-request timings: the JS edge, performance.now() when each engine event reaches
//     the handler (src/metrics/observe.ts), arrival = the HTTP request's arrival.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { EngineStats, EngineTimings, FinishReason } from '../engine/native-types.js';
import { registerLog2Histogram } from './log2-histogram.js';

/** vLLM's vllm:time_to_first_token_seconds buckets. */
export const TTFT_BUCKETS = [
  0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
  160.0, 640.0, 2560.0,
];
/** vLLM's vllm:inter_token_latency_seconds / vllm:time_per_output_token_seconds buckets. */
export const TPOT_BUCKETS = [
  0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
/** vLLM's request_latency_buckets (e2e, queue, prefill, decode, inference time). */
export const REQUEST_LATENCY_BUCKETS = [
  0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
  1920.0, 7680.0,
];
/** vLLM's vllm:iteration_tokens_total buckets (powers of two: the engine counts steps per power of two). */
export const ITERATION_TOKENS_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384];
/** vLLM's vllm:request_params_n buckets. */
export const N_BUCKETS = [1, 2, 5, 10, 20];
/** Ours, for image preparation (decode + resize) and image encoding: 1 ms .. 20 s. */
export const PREPROCESS_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0];

/** vLLM's build_1_2_5_buckets(max): 1, 2, 5, 10, 20, 50, ... up to max. */
export function build125Buckets(max: number): number[] {
  const out: number[] = [];
  for (let scale = 1; ; scale *= 10) {
    for (const m of [1, 2, 5]) {
      const v = m * scale;
      if (v > max) return out;
      out.push(v);
    }
  }
}

export interface ServerMetricsOptions {
  /** The served model name (the first --served-model-name), the `model_name` label. */
  modelName: string;
  /** Per-request context limit; the token histograms' buckets go up to it, as vLLM's. */
  maxModelLen: number;
  /** Engine counters and state, read at every scrape. */
  engineStats: () => EngineStats;
  /** Node process metrics (collectDefaultMetrics); default true. */
  processMetrics?: boolean;
  /** Requests accepted by the server and not yet handed to the engine, read at every scrape. */
  preprocessing?: () => number;
}

/** One finished choice (vLLM: one finished request; n choices count as n, as vLLM's child requests do). */
export interface FinishedChoice {
  reason: FinishReason;
  promptTokens: number;
  completionTokens: number;
  /** Arrival -> finish, seconds. */
  e2eSeconds: number;
  /** The engine's split of its time; absent when the request never got a sequence. */
  timings?: EngineTimings;
}

type Labels = { model_name: string; engine: string };
interface Observer {
  observe(value: number): void;
}

export class ServerMetrics {
  readonly registry = new Registry();
  /** Engine stats of the scrape in progress. */
  private snapshot: EngineStats | undefined;
  private readonly labels: Labels;
  private readonly ttft: Observer;
  private readonly itl: Observer;
  private readonly tpot: Observer;
  private readonly requestTpot: Observer;
  private readonly e2e: Observer;
  private readonly queueTime: Observer;
  private readonly prefillTime: Observer;
  private readonly decodeTime: Observer;
  private readonly inferenceTime: Observer;
  private readonly imageEncode: Observer;
  private readonly promptTokens: Observer;
  private readonly generationTokens: Observer;
  private readonly maxTokensParam: Observer;
  private readonly nParam: Observer;
  private readonly success: Counter<string>;
  private readonly images: Counter<string>;
  private readonly preprocess: Observer;
  private readonly rejected: Counter<string>;
  private readonly timeouts: Counter<string>;
  private readonly httpRequests: Counter<string>;
  private readonly httpDuration: Histogram<string>;

  constructor(private readonly opts: ServerMetricsOptions) {
    const r = this.registry;
    this.labels = { model_name: opts.modelName, engine: '0' };
    const labelNames = ['model_name', 'engine'];
    const L = this.labels;
    // One stats() call per scrape (render()), shared by every collector of that scrape.
    const stats = (): EngineStats => (this.snapshot ??= opts.engineStats());
    const gauge = (name: string, help: string, read: (s: EngineStats) => number): void => {
      new Gauge({
        name, help, labelNames, registers: [r],
        collect() {
          this.set(L, read(stats()));
        },
      });
    };
    // Exported from the start, with zero counts, as vLLM's per-engine children are.
    const hist = (name: string, help: string, buckets: number[]) => {
      const h = new Histogram({ name, help, labelNames, buckets, registers: [r] });
      h.zero(L);
      return h.labels(L);
    };

    // ---- vLLM: scheduler state and KV cache ----
    gauge('vllm:num_requests_running', 'Number of requests in model execution batches.', (s) => s.running);
    gauge('vllm:num_requests_waiting', 'Number of requests waiting to be processed.', (s) => s.waiting);
    const kvUsage = (s: EngineStats) => (s.kvTotalCells > 0 ? s.kvUsedCells / s.kvTotalCells : 0);
    gauge('vllm:kv_cache_usage_perc', 'KV-cache usage. 1 means 100 percent usage.', kvUsage);
    gauge('vllm:gpu_cache_usage_perc', 'GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: Use vllm:kv_cache_usage_perc instead.', kvUsage);

    // ---- vLLM: counters ----
    // A counter mirroring a monotonic engine total, brought up to date at every scrape.
    const counter = (name: string, help: string, read: (s: EngineStats) => number): void => {
      let last = 0;
      new Counter({
        name, help, labelNames, registers: [r],
        collect() {
          const v = read(stats());
          if (v > last) this.inc(L, v - last);
          last = Math.max(last, v);
        },
      }).inc(L, 0);
    };
    counter('vllm:prompt_tokens_total', 'Number of prefill tokens processed.', (s) => s.promptTokensTotal);
    counter('vllm:generation_tokens_total', 'Number of generation tokens processed.', (s) => s.generationTokensTotal);
    counter('vllm:num_preemptions_total', 'Cumulative number of preemption from the engine.', (s) => s.preemptions ?? 0);
    this.success = new Counter({
      name: 'vllm:request_success_total', help: 'Count of successfully processed requests.',
      labelNames: [...labelNames, 'finished_reason'], registers: [r],
    });
    for (const reason of ['stop', 'length', 'abort', 'error']) this.success.inc({ ...L, finished_reason: reason }, 0);

    // ---- vLLM: per-request histograms ----
    const tokenBuckets = build125Buckets(Math.max(1, opts.maxModelLen));
    this.promptTokens = hist('vllm:request_prompt_tokens', 'Number of prefill tokens processed.', tokenBuckets);
    this.generationTokens = hist('vllm:request_generation_tokens', 'Number of generation tokens processed.', tokenBuckets);
    this.maxTokensParam = hist('vllm:request_params_max_tokens', 'Histogram of the max_tokens request parameter.', tokenBuckets);
    this.nParam = hist('vllm:request_params_n', 'Histogram of the n request parameter.', N_BUCKETS);
    this.ttft = hist('vllm:time_to_first_token_seconds', 'Histogram of time to first token in seconds.', TTFT_BUCKETS);
    this.itl = hist('vllm:inter_token_latency_seconds', 'Histogram of inter-token latency in seconds.', TPOT_BUCKETS);
    this.tpot = hist('vllm:time_per_output_token_seconds', 'Histogram of time per output token in seconds.DEPRECATED: Use vllm:inter_token_latency_seconds instead.', TPOT_BUCKETS);
    this.requestTpot = hist('vllm:request_time_per_output_token_seconds', 'Histogram of time_per_output_token_seconds per request.', TPOT_BUCKETS);
    this.e2e = hist('vllm:e2e_request_latency_seconds', 'Histogram of e2e request latency in seconds.', REQUEST_LATENCY_BUCKETS);
    this.queueTime = hist('vllm:request_queue_time_seconds', 'Histogram of time spent in WAITING phase for request.', REQUEST_LATENCY_BUCKETS);
    this.prefillTime = hist('vllm:request_prefill_time_seconds', 'Histogram of time spent in PREFILL phase for request.', REQUEST_LATENCY_BUCKETS);
    this.decodeTime = hist('vllm:request_decode_time_seconds', 'Histogram of time spent in DECODE phase for request.', REQUEST_LATENCY_BUCKETS);
    this.inferenceTime = hist('vllm:request_inference_time_seconds', 'Histogram of time spent in RUNNING phase for request.', REQUEST_LATENCY_BUCKETS);
    registerLog2Histogram(r, {
      name: 'vllm:iteration_tokens_total', help: 'Histogram of number of tokens per engine_step.', buckets: ITERATION_TOKENS_BUCKETS, labels: L,
      read: () => {
        const s = stats();
        return { counts: s.stepTokens, sum: s.stepTokensSum };
      },
    });

    // ---- caprl: images, engine steps, admission ----
    this.images = new Counter({ name: 'caprl:images_received_total', help: 'Images received in requests that reached image preparation.', labelNames, registers: [r] });
    this.images.inc(L, 0);
    this.preprocess = hist(
      'caprl:request_preprocessing_seconds',
      "Time from a request's parsed body to its hand-over to the engine: validation, image decode and resize, chat template, tokenization.",
      PREPROCESS_BUCKETS,
    );
    this.imageEncode = hist(
      'caprl:image_encode_seconds',
      "Time the vision encoder spent on a request's images (embedding-cache hits take none), per request with images.",
      PREPROCESS_BUCKETS,
    );
    const engineCounter = (name: string, help: string, read: (s: EngineStats) => number): void => counter(name, help, read);
    engineCounter('caprl:engine_steps_total', 'Engine steps (llama_decode calls) made.', (s) => s.steps);
    engineCounter(
      'caprl:engine_step_sequences_total',
      'Sequences that decoded a token, summed over engine steps (rate() of this over rate() of caprl:engine_steps_total = mean sequences per step).',
      (s) => s.decodedSeqsTotal,
    );
    engineCounter('caprl:image_cache_hits_total', 'Images whose embeddings came from the image-embedding cache (same pixels and size as an earlier image).', (s) => s.imageCacheHits);
    engineCounter('caprl:image_cache_misses_total', 'Images the vision encoder had to encode (not in the image-embedding cache).', (s) => s.imageCacheMisses);
    engineCounter(
      'caprl:kv_stream_moves_total',
      'Per-sequence KV layout: sequences whose KV stream was copied to a lower sequence id, so that the decoding sequences hold consecutive ids and decode in one ubatch.',
      (s) => s.streamMoves,
    );
    engineCounter('caprl:engine_busy_seconds_total', 'Engine-thread seconds spent in steps with sequences running.', (s) => s.busySeconds);
    engineCounter('caprl:engine_model_seconds_total', 'Of the busy seconds: the model (llama_decode of image rows and of the batch, until its logits are ready).', (s) => s.modelSeconds);
    engineCounter('caprl:engine_sample_seconds_total', 'Of the busy seconds: drawing the tokens from the logits.', (s) => s.sampleSeconds);
    engineCounter(
      'caprl:engine_cpu_wait_seconds_total',
      'Of the busy seconds: waiting for the CPU while the vision encoder had its turn (model and vision encoder both on the CPU take turns with every core).',
      (s) => s.cpuWaitSeconds,
    );
    gauge('caprl:engine_last_step_sequences', 'Sequences that decoded a token in the last engine step.', (s) => s.lastBatchSeqs);
    gauge('caprl:engine_max_step_sequences', 'Most sequences decoded together in one engine step since start.', (s) => s.maxBatchSeqs);
    gauge('caprl:kv_cache_used_tokens', 'KV cache cells (tokens) held by running sequences.', (s) => s.kvUsedCells);
    gauge('caprl:kv_cache_total_tokens', 'KV cache size in cells (tokens), shared by all sequences.', (s) => s.kvTotalCells);
    const preprocessing = opts.preprocessing;
    new Gauge({
      name: 'caprl:num_requests_preprocessing', help: 'Requests accepted by the HTTP server and not yet handed to the engine (body upload, validation, image preparation).',
      labelNames, registers: [r],
      collect() {
        this.set(L, preprocessing ? preprocessing() : 0);
      },
    });
    this.rejected = new Counter({
      name: 'caprl:requests_rejected_total', help: 'Requests refused before reaching the engine: queue_full (429) or shutting_down (503).',
      labelNames: [...labelNames, 'reason'], registers: [r],
    });
    for (const reason of ['queue_full', 'shutting_down']) this.rejected.inc({ ...L, reason }, 0);
    this.timeouts = new Counter({ name: 'caprl:request_timeouts_total', help: 'Requests cancelled by --request-timeout.', labelNames, registers: [r] });
    this.timeouts.inc(L, 0);

    // ---- HTTP, as vLLM's prometheus-fastapi-instrumentator reports it ----
    this.httpRequests = new Counter({
      name: 'http_requests_total', help: 'Total number of requests by method, status and handler.',
      labelNames: ['method', 'status', 'handler'], registers: [r],
    });
    this.httpDuration = new Histogram({
      name: 'http_request_duration_seconds', help: 'Latency with only few buckets by handler.',
      labelNames: ['method', 'handler'], buckets: [0.1, 0.5, 1], registers: [r],
    });

    if (opts.processMetrics ?? true) collectDefaultMetrics({ register: r });
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  /** The Prometheus text exposition. */
  async render(): Promise<string> {
    this.snapshot = undefined;
    try {
      return await this.registry.metrics();
    } finally {
      this.snapshot = undefined;
    }
  }

  // ---- recording (called by the request observer and the HTTP hooks) ----

  requestStarted(n: number, maxTokens: number, images: number, preprocessingSeconds: number | undefined): void {
    this.nParam.observe(n);
    this.maxTokensParam.observe(maxTokens);
    if (images > 0) this.images.inc(this.labels, images);
    if (preprocessingSeconds !== undefined) this.preprocess.observe(preprocessingSeconds);
  }

  firstToken(seconds: number): void {
    this.ttft.observe(seconds);
  }

  /** `count` tokens arrived together `seconds` after the previous one: each gets seconds / count. */
  interTokens(seconds: number, count: number): void {
    const per = seconds / count;
    for (let i = 0; i < count; i++) {
      this.itl.observe(per);
      this.tpot.observe(per);
    }
  }

  choiceFinished(f: FinishedChoice): void {
    this.success.inc({ ...this.labels, finished_reason: f.reason });
    this.e2e.observe(f.e2eSeconds);
    this.promptTokens.observe(f.promptTokens);
    this.generationTokens.observe(f.completionTokens);
    const t = f.timings;
    if (!t) return;
    // As vLLM: queue time once admitted; the phases once a token was sampled.
    this.queueTime.observe(t.queued);
    if (t.imageEncode !== undefined) this.imageEncode.observe(t.imageEncode);
    if (t.prefill === undefined || t.decode === undefined) return;
    this.prefillTime.observe(t.prefill);
    this.decodeTime.observe(t.decode);
    this.inferenceTime.observe(t.prefill + t.decode);
    if (f.completionTokens > 1) this.requestTpot.observe(t.decode / (f.completionTokens - 1));
  }

  rejectedRequest(reason: 'queue_full' | 'shutting_down'): void {
    this.rejected.inc({ ...this.labels, reason });
  }

  timedOut(): void {
    this.timeouts.inc(this.labels);
  }

  /** One HTTP request answered (status grouped as 2xx/4xx/5xx, as the instrumentator does by default). */
  httpRequest(method: string, handler: string, status: number, seconds: number): void {
    this.httpRequests.inc({ method, handler, status: `${Math.floor(status / 100)}xx` });
    this.httpDuration.observe({ method, handler }, seconds);
  }
}
