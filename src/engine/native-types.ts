// The whole JS/C++ boundary: what the native addon (native/addon.cpp) takes and gives.
// Everything here is plain data; the addon validates nothing that JS already validated
// at the edge (src/entrypoints), but it never trusts sizes it can check cheaply.

/** Options fixed for the life of an engine (one model, one KV cache). */
export interface EngineOptions {
  /** Path of the text GGUF. */
  model: string;
  /** Path of the mmproj (vision) GGUF; without it, image requests are refused. */
  mmproj?: string;
  /**
   * The KV cache (one pool of cells shared by all sequences) is sized by exactly one of nCtx,
   * kvCacheBytes and memoryFraction. nCtx: its size in tokens.
   */
  nCtx?: number;
  /** As many tokens as fit these bytes (vLLM's --kv-cache-memory-bytes). */
  kvCacheBytes?: number;
  /**
   * The engine's share of the memory of the device that holds the KV cache (vLLM's
   * --gpu-memory-utilization): weights, vision encoder, compute buffers and KV cache together.
   */
  memoryFraction?: number;
  /** Longest sequence (prompt + output) in tokens; default nCtx. */
  maxModelLen?: number;
  /**
   * Most sequences decoded at once (slots), at most 256 (llama.cpp's limit). 0: as many as the KV
   * cache holds at maxModelLen, so each gets a KV stream of its own, but at least 16 (EngineInfo.maxSeqs
   * says how many).
   */
  maxSeqs: number;
  /** Most tokens in one llama_decode batch (prefill chunks + decode tokens). */
  nBatch: number;
  /** llama.cpp's ubatch: rows per pass over the weights (default min(nBatch, 512)). */
  nUbatch?: number;
  /** CPU threads for decode; 0 = all cores, or with the model on a GPU the cores left after the vision worker's. */
  nThreads?: number;
  /**
   * Threads drawing each step's tokens (one sampler per sequence, so the tokens do not depend on
   * the count); 0 = the decode threads, at most 8, for vocabularies of 32768 tokens or more, else 1.
   */
  nSamplingThreads?: number;
  /**
   * CPU threads of the vision worker; 0 = the decode threads when the model is on the CPU too (the two
   * take turns), else a quarter of the threads, at least 1 (encoding beside decoding).
   */
  nVisionThreads?: number;
  /** Layers to offload to the GPU; -1 = all. Ignored on CPU builds. */
  nGpuLayers?: number;
  /** Jinja chat template overriding the model's own. */
  chatTemplate?: string;
  /** llama.cpp log lines at or above this level reach stderr: 'none' | 'error' | 'warn' | 'info' | 'debug'. */
  logLevel?: string;
  /** Bytes of image embeddings kept for reuse (keyed by pixels and size); default 256 MiB, 0 = off. */
  imageCacheBytes?: number;
  /**
   * Which vision encoder computes image embeddings: 'llama.cpp' (mtmd/clip, one image at a time;
   * the default) or 'caprl' (native/qwen-vision-encoder.cpp: every queued image in one batched pass).
   */
  visionEncoder?: VisionEncoderKind;
}

/** Per-request sampling, already validated and defaulted by JS. */
export interface SamplingParams {
  /** 0 = greedy. */
  temperature: number;
  topP: number;
  /** 0 or less = disabled. */
  topK: number;
  minP: number;
  repetitionPenalty: number;
  presencePenalty: number;
  frequencyPenalty: number;
  /** -1 = random. */
  seed: number;
  /** Output tokens at most; -1: the rest of the context (--max-model-len less the prompt), as vLLM's default. */
  maxTokens: number;
  minTokens: number;
  ignoreEos: boolean;
  stop: string[];
  stopTokenIds: number[];
  /** Number of top log-probabilities to return per token; -1 = none, 0 = only the chosen token's. */
  logprobs: number;
}

/** An RGB image already resized by src/images to the encoder's grid. */
export interface EngineImage {
  width: number;
  height: number;
  /** width * height * 3 bytes, RGBRGB... */
  rgb: Buffer;
}

export interface EngineRequest {
  /** Caller-chosen id, unique among live requests. */
  id: number;
  /** Choices to sample from one shared prefill (1..maxSeqs); each gets its own events and finish. */
  n?: number;
  /** Fully templated prompt; each image stands where the media marker (EngineInfo.mediaMarker) is. */
  prompt: string;
  images: EngineImage[];
  sampling: SamplingParams;
}

export interface TokenLogprob {
  token: number;
  text: string;
  logprob: number;
  top: { token: number; text: string; logprob: number }[];
}

export type FinishReason = 'stop' | 'length' | 'abort' | 'error';

/** Whose fault a failed request is (llama-server's error types): client -> 400, capacity -> 503, internal -> 500. */
export type ErrorKind = 'client' | 'capacity' | 'internal';

/** The engine took the request's prompt: its KV cells (images included, counted once) and the output length it gets. */
export interface PromptAccepted {
  promptTokens: number;
  maxTokens: number;
}

/** A batch of progress for one request; events reach JS in batches, one callback per engine step at most. */
export interface EngineEvent {
  id: number;
  /** Choice index, 0..n-1. */
  index: number;
  /** On choice 0, once, before any token: the prompt passed the engine's checks (Generation.admission). */
  accepted?: PromptAccepted;
  /** Token ids generated since the last event. */
  tokens: number[];
  /** Text released since the last event (stop strings and incomplete UTF-8 held back). */
  text: string;
  logprobs?: TokenLogprob[];
  /** Present on the last event of a choice. */
  finish?: {
    reason: FinishReason;
    promptTokens: number;
    completionTokens: number;
    /** Why the request failed, when reason is 'error'. */
    error?: string;
    /** With reason 'error': whose fault it was. */
    errorKind?: ErrorKind;
    /** A client fault's request field ('prompt', 'max_tokens', 'n'). */
    errorParam?: string;
    /** A client fault's OpenAI error code ('context_length_exceeded'), if any. */
    errorCode?: string;
    /** The stop string or token id that ended the request, when one did. */
    stoppedBy?: string | number;
    /** Time in the engine; absent when the request never got a sequence (cancelled while queued, bad prompt). */
    timings?: EngineTimings;
  };
}

/**
 * One choice's time in the engine, in seconds, taken on the engine thread with a monotonic clock;
 * split as vLLM splits a request.
 */
export interface EngineTimings {
  /** Entered the engine's inbox -> admitted into a sequence (the first time: preemption does not queue again). */
  queued: number;
  /** Admitted -> first token sampled (waiting for and running the image encode included); absent without a token. */
  prefill?: number;
  /** First -> last token sampled (time preempted included); absent without a token. */
  decode?: number;
  /** Time the vision worker spent encoding the request's images (embedding-cache hits 0); on choice 0 of a request with images. */
  imageEncode?: number;
}

export interface EngineStats {
  /** llama_decode calls made for generation steps. */
  steps: number;
  /** Sequences that had a token decoded in the last step. */
  lastBatchSeqs: number;
  /** Largest number of sequences decoded together in one step since start. */
  maxBatchSeqs: number;
  /** Sum over steps of sequences decoded (tokens generated), for mean batch size. */
  decodedSeqsTotal: number;
  running: number;
  waiting: number;
  kvUsedCells: number;
  kvTotalCells: number;
  promptTokensTotal: number;
  generationTokensTotal: number;
  /** Sequences whose KV cells were taken back to make room (they resume by prefilling again). */
  preemptions: number;
  /**
   * With a KV stream per sequence: sequences moved to a lower sequence id (their stream copied), so
   * that the decoding ones hold consecutive ids and each step decodes them in one ubatch.
   */
  streamMoves: number;
  /** Images whose embeddings came from the cache (same pixels and size as an earlier image). */
  imageCacheHits: number;
  imageCacheMisses: number;
  /**
   * Tokens per engine step (prompt, decode and image-embedding rows decoded), a histogram:
   * stepTokens[k] counts the steps with 2^(k-1) < tokens <= 2^k (k = 0: one token).
   */
  stepTokens: number[];
  /** Sum of the tokens over those steps. */
  stepTokensSum: number;
  /**
   * Engine-thread seconds in steps with sequences running (busy), the part in the model
   * (llama_decode of image rows and the batch, until its logits are ready) and the part in the
   * draws; busy - model - sample - cpuWait is host work (scheduling, batch building, events).
   */
  busySeconds: number;
  modelSeconds: number;
  sampleSeconds: number;
  /** Of the busy seconds: waiting for the CPU while the vision encoder had its turn (EngineInfo.threads.cpuTurns). */
  cpuWaitSeconds: number;
}

export interface EngineInfo {
  /** The model's chat template (or the override). */
  chatTemplate: string;
  mediaMarker: string;
  nCtx: number;
  /** Longest sequence (prompt + output) in tokens: maxModelLen, or what one sequence's KV holds. */
  maxModelLen: number;
  nCtxTrain: number;
  nVocab: number;
  hasVision: boolean;
  /**
   * Image prompts go in as one run of embedding rows, their text read from the model's token-embedding
   * table (one prefill pass each); false: their text goes in token batches (the table is not readable).
   */
  imagePromptRows: boolean;
  /** Backend devices in use, e.g. ["CPU"] or ["CUDA0 (NVIDIA H100 80GB HBM3, 81559 MiB)"]. */
  devices: string[];
  /** Most sequences decoded at once (EngineOptions.maxSeqs): the cap on n. */
  maxSeqs: number;
  /** Layers llama.cpp can offload (repeating layers + output) and how many sit on a GPU. */
  nLayers: number;
  nGpuLayers: number;
  /**
   * CPU threads of the model and of the vision encoder (0 without an mmproj). cpuTurns: both compute
   * on the CPU, so they take turns with every thread (the engine thread runs the encoder passes between its steps) instead of splitting the cores.
   */
  threads: { model: number; vision: number; cpuTurns: boolean };
  kvCache: KvCacheInfo;
  /** Our vision encoder (visionEncoder 'caprl'); null with llama.cpp's clip or without an mmproj. */
  visionEncoder: VisionEncoderInfo | null;
}

/** What our vision encoder holds; its compute buffers are reserved at start-up under memoryFraction sizing. */
export interface VisionEncoderMemory {
  /** Patches per graph (and per vision-worker pass): what the compute buffers are sized for. */
  maxPatches: number;
  devices: VisionDeviceBytes[];
}

export interface VisionEncoderInfo extends VisionEncoderMemory {
  kind: 'caprl';
}

export interface VisionDeviceBytes {
  /** ggml's device name, e.g. "CPU", "CUDA0". */
  device: string;
  /** In host memory (then counted in kvCache.nonKvBytes when the KV cache is too). */
  host: boolean;
  weightsBytes: number;
  /** 0 until reserved or the first batch allocates them. */
  computeBytes: number;
}

/** How the KV cache was sized and what it costs on the device that holds it. */
export interface KvCacheInfo {
  sizedBy: 'tokens' | 'bytes' | 'memory-fraction';
  /**
   * 'per-sequence': a KV stream per sequence (its attention reads only its own cells), chosen when
   * the cache holds every sequence at --max-model-len; 'unified': one pool shared by all.
   */
  layout: 'unified' | 'per-sequence';
  /** e.g. "CUDA0" or "CPU". */
  device: string;
  onGpu: boolean;
  deviceTotalBytes: number;
  /** Free before the engine loaded anything. */
  deviceFreeBytes: number;
  tokens: number;
  /** KV buffers as allocated. */
  bytes: number;
  bytesPerToken: number;
  /** llama.cpp's compute buffers on that device. */
  computeBytes: number;
  /** Memory-fraction sizing: weights, vision encoder and runtime counted against the share. */
  nonKvBytes: number;
  memoryFraction: number;
}

/** A GPU ggml can use (none on a CPU build). */
export interface GpuDevice {
  name: string;
  description: string;
  totalBytes: number;
  freeBytes: number;
}

export interface ChatTemplateMessage {
  role: string;
  /** Text with image parts already replaced by the media marker. */
  content: string;
}

/** The addon's Engine class as JS sees it. */
export interface NativeEngine {
  info(): EngineInfo;
  /**
   * Validates and holds a request until flush(); events arrive through the onEvents callback
   * given to the constructor. A cancel flushes first, so it never overtakes its request.
   */
  submit(req: EngineRequest): void;
  /** Hands every held request to the engine thread at once, so a burst starts in one step. */
  flush(): void;
  /** Cancels a live request; its final event has reason 'abort'. Unknown ids are ignored. */
  cancel(id: number): void;
  tokenize(text: string, addSpecial: boolean, parseSpecial: boolean): number[];
  /**
   * A templated prompt as the engine takes it, images by their size: each part's token ids, or an
   * image's KV cells (mtmd's plan). Throws with the engine's message (a marker without its image ...).
   */
  tokenizePrompt(prompt: string, imageSizes: { width: number; height: number }[], addSpecial: boolean): (number[] | number)[];
  detokenize(tokens: number[]): string;
  /** Renders messages with the chat template through llama.cpp's common chat code (jinja), as llama-server does. */
  applyChatTemplate(messages: ChatTemplateMessage[], addGenerationPrompt: boolean): string;
  stats(): EngineStats;
  /** Stops the engine thread after cancelling everything live; resolves once it has joined. */
  close(): Promise<void>;
}

export interface NativeEngineConstructor {
  new (options: EngineOptions, onEvents: (events: EngineEvent[]) => void): NativeEngine;
}

export interface NativeAddon {
  Engine: NativeEngineConstructor;
  /** Builds info: llama.cpp commit, CUDA on/off. */
  buildInfo(): { llamaCommit: string; cuda: boolean; system: string };
  /** The GPUs this build sees, before any engine is created. */
  gpuDevices(): GpuDevice[];
  /** The engine's limits: most sequences (llama.cpp's), and the fewest that maxSeqs 0 gives. */
  engineLimits(): { maxSeqs: number; autoMinSeqs: number };
  /** A vision encoder on its own, for tests and benchmarks comparing ours with llama.cpp's. */
  VisionEncoder: NativeVisionEncoderConstructor;
  /**
   * Pillow's bicubic resize of RGB8 pixels (width * height * 3 bytes, row-major) to
   * outWidth x outHeight, on libuv's pool (kernels/image-prep-ref: as llama.cpp's mtmd and PIL).
   */
  resizeRgb(rgb: Buffer, width: number, height: number, outWidth: number, outHeight: number): Promise<Buffer>;
}

export type VisionEncoderKind = 'llama.cpp' | 'caprl';

export interface VisionEncoderOptions {
  /** Text GGUF: llama.cpp's encoder (mtmd) takes its embedding size and vocab from it. */
  model: string;
  mmproj: string;
  encoder: VisionEncoderKind;
  /** CPU threads; default 1. */
  nThreads?: number;
  /** Run on the first GPU when the build has one; default true. */
  useGpu?: boolean;
}

export interface VisionEncodeResult {
  /** Per image, [tokens][nEmbd] row-major: the rows the engine decodes after the image's position. */
  embeddings: Float32Array[];
  nEmbd: number;
  /** Wall time of the call (preprocessing + encoding); ours encodes all images in one pass, llama.cpp's one by one. */
  ms: number;
  /** Our encoder's ggml backend ('CPU', 'CUDA0'), or 'clip'. */
  backend: string;
  /**
   * Ours: where the call's time went, summed over its graphs: pixels to patches (CPU), graph build
   * and allocation, inputs copied to the device, compute, embeddings read back in clip's order.
   */
  phases?: { prepMs: number; buildMs: number; uploadMs: number; computeMs: number; downloadMs: number };
}

export interface NativeVisionEncoder {
  /** Synchronous: blocks the JS thread while it encodes. */
  encode(images: EngineImage[]): VisionEncodeResult;
  /** Ours: allocates the compute buffers of its largest graph now. No-op for llama.cpp's. */
  reserve(): void;
  /** Ours: what it holds now; null for llama.cpp's. */
  memory(): VisionEncoderMemory | null;
}

export interface NativeVisionEncoderConstructor {
  new (options: VisionEncoderOptions): NativeVisionEncoder;
}
