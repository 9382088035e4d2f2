// What every route that serves the model is given: the engine, the names clients may use, and the
// request rules set at start-up (image limits and sources, logprobs, n, the server seed).
import type { Engine } from '../engine/engine.js';
import type { ImageSourceOptions } from '../images/image-source.js';
import type { PrepareOptions } from '../images/prepare.js';

export interface ServingContext {
  engine: Engine;
  /** Names clients may use in `model`; the first is reported as the default. */
  servedModelNames: readonly string[];
  /** Image resize limits (default: llama.cpp mtmd's Qwen2.5-VL limits). */
  imageOptions: PrepareOptions;
  /** Where image URLs may be fetched / read from, and the limits on that. */
  imageSource: ImageSourceOptions;
  /** Most images in one request (--limit-mm-per-prompt). */
  limitImagesPerPrompt: number;
  /** Most top logprobs a request may ask for (--max-logprobs). */
  maxLogprobs?: number;
  /** Most choices per request (`n`): the engine's sequence slots (--max-num-seqs). */
  maxNumSeqs?: number;
  /** Server-wide seed (vLLM --seed): requests without `seed` get seeds drawn from it in arrival order. */
  seed?: number;
  /** One info log line per request (default true; --disable-log-requests). */
  logRequests?: boolean;
  /** False while the server shuts down: new requests get 503. */
  isAccepting: () => boolean;
}
