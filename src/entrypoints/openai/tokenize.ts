// vLLM's POST /tokenize and POST /detokenize, and the token <-> text helpers behind them.
//   /tokenize   {model?, prompt, add_special_tokens=true, return_token_strs=false}
//            or {model?, messages, add_generation_prompt=true, add_special_tokens=false, return_token_strs}
//            -> {count, max_model_len, tokens, token_strs}
//   /detokenize {model?, tokens} -> {prompt}
// Images in `messages` are loaded and sized like a chat request's, and stand in the token list
// as the HF processor expands them: <|vision_start|>, one <|image_pad|> per merged 28x28 patch,
// <|vision_end|>; so `count` is exactly the prompt_tokens a chat request with the same
// messages reports.
//
// The engine's detokenize renders special tokens as nothing (llama.cpp, unparse_special off);
// HF's decode (vLLM's /detokenize) writes them out. TokenText restores them: it learns the text
// of Qwen's special tokens once, and writes those between runs of ordinary tokens.
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Engine } from '../../engine/engine.js';
import { prepareImages } from '../../serving/images.js';
import { toTemplateMessages } from '../../serving/prompt.js';
import type { ServingContext } from '../../serving/context.js';
import { badRequest } from '../../serving/errors.js';
import type { DetokenizeResponse, TokenizeResponse } from '../../serving/protocol.js';
import { bool, describe, isObject, validateMessages, validateModelField } from '../../serving/validate.js';

/** Qwen2 / Qwen2.5-VL added tokens the tokenizer marks special. */
const QWEN_SPECIAL_TOKENS = [
  '<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|object_ref_start|>', '<|object_ref_end|>',
  '<|box_start|>', '<|box_end|>', '<|quad_start|>', '<|quad_end|>', '<|vision_start|>', '<|vision_end|>',
  '<|vision_pad|>', '<|image_pad|>', '<|video_pad|>', '<|fim_prefix|>', '<|fim_middle|>', '<|fim_suffix|>',
  '<|fim_pad|>', '<|repo_name|>', '<|file_sep|>',
];

export class TokenText {
  /** Special token id -> its text, for the special tokens this vocabulary has. */
  private readonly special = new Map<number, string>();

  constructor(private readonly engine: Engine) {
    for (const text of QWEN_SPECIAL_TOKENS) {
      const ids = engine.tokenize(text, false, true);
      if (ids.length === 1 && engine.detokenize(ids) === '') this.special.set(ids[0]!, text);
    }
  }

  /** The id of a special token, if the vocabulary has it. */
  idOf(text: string): number | undefined {
    for (const [id, t] of this.special) if (t === text) return id;
    return undefined;
  }

  /** Text of a token sequence with special tokens written out (HF decode, skip_special_tokens=False). */
  detokenize(tokens: readonly number[]): string {
    let out = '';
    let run: number[] = [];
    for (const t of tokens) {
      const s = this.special.get(t);
      if (s === undefined) {
        run.push(t);
        continue;
      }
      if (run.length > 0) out += this.engine.detokenize(run);
      run = [];
      out += s;
    }
    if (run.length > 0) out += this.engine.detokenize(run);
    return out;
  }

  /** The text of each token on its own. */
  pieces(tokens: readonly number[]): string[] {
    return tokens.map((t) => this.special.get(t) ?? this.engine.detokenize([t]));
  }
}

export interface TokenizeHandlerOptions extends Pick<ServingContext, 'engine' | 'servedModelNames' | 'imageOptions' | 'imageSource' | 'limitImagesPerPrompt'> {
  tokenText: TokenText;
}

/** Validates token ids for `param`: integers in [0, nVocab). */
export function validateTokenIds(v: unknown, param: string, nVocab: number): number[] {
  if (!Array.isArray(v)) throw badRequest(`\`${param}\` must be an array of token ids, got ${describe(v)}`, param);
  for (const id of v) {
    if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= nVocab) {
      throw badRequest(`\`${param}\` must hold token ids in [0, ${nVocab - 1}], got ${JSON.stringify(id)}`, param);
    }
  }
  return v as number[];
}

export function createTokenizeHandler(opts: TokenizeHandlerOptions) {
  const { engine, tokenText } = opts;
  return async function tokenize(request: FastifyRequest, reply: FastifyReply): Promise<TokenizeResponse> {
    const body = request.body;
    if (!isObject(body)) throw badRequest(`Request body must be a JSON object, got ${describe(body)}`);
    validateModelField(body, { servedModelNames: opts.servedModelNames });
    const returnStrs = bool(body, 'return_token_strs') ?? false;
    let tokens: number[];
    if (body.messages !== undefined) {
      if (bool(body, 'continue_final_message') === true) {
        throw badRequest('`continue_final_message` is not supported by this server', 'continue_final_message');
      }
      const messages = validateMessages(body.messages);
      const addGenerationPrompt = bool(body, 'add_generation_prompt') ?? true;
      const addSpecial = bool(body, 'add_special_tokens') ?? false;
      const { templateMessages, images: refs } = toTemplateMessages(messages, engine.info.mediaMarker);
      if (refs.length > 0 && !engine.info.hasVision) {
        throw badRequest('image input is not supported: the server was started without a vision projector (--mmproj)', refs[0]!.param);
      }
      // The client left (response closed before it was written): stop fetching its images.
      const ac = new AbortController();
      reply.raw.once('close', () => {
        if (!reply.raw.writableEnded) ac.abort();
      });
      const images = await prepareImages(
        refs,
        { imageOptions: opts.imageOptions ?? {}, imageSource: opts.imageSource ?? {}, limit: opts.limitImagesPerPrompt },
        ac.signal,
      );
      let prompt: string;
      try {
        prompt = engine.applyChatTemplate(templateMessages, addGenerationPrompt);
      } catch (err) {
        throw badRequest(`could not apply the chat template: ${err instanceof Error ? err.message : String(err)}`, 'messages');
      }
      const pad = images.length > 0 ? tokenText.idOf('<|image_pad|>') : undefined;
      if (images.length > 0 && pad === undefined) throw badRequest('this model has no <|image_pad|> token to stand for images', 'messages');
      // As the engine takes the prompt (its own tokenization, images planned by mtmd from their
      // size): each image stands as <|image_pad|> once per KV cell it takes.
      let parts: (number[] | number)[];
      try {
        parts = engine.tokenizePrompt(prompt, images, addSpecial);
      } catch (err) {
        throw badRequest(err instanceof Error ? err.message : String(err), 'messages');
      }
      tokens = parts.flatMap((p) => (typeof p === 'number' ? new Array<number>(p).fill(pad!) : p));
    } else {
      const prompt = body.prompt;
      if (typeof prompt !== 'string') {
        throw badRequest(prompt === undefined ? 'either `prompt` or `messages` is required' : `\`prompt\` must be a string, got ${describe(prompt)}`, 'prompt');
      }
      tokens = engine.tokenize(prompt, bool(body, 'add_special_tokens') ?? true, true);
    }
    return {
      count: tokens.length,
      max_model_len: opts.engine.info.maxModelLen,
      tokens,
      token_strs: returnStrs ? tokenText.pieces(tokens) : null,
    };
  };
}

export function createDetokenizeHandler(opts: Pick<TokenizeHandlerOptions, 'engine' | 'servedModelNames' | 'tokenText'>) {
  return async function detokenize(request: FastifyRequest, _reply: FastifyReply): Promise<DetokenizeResponse> {
    const body = request.body;
    if (!isObject(body)) throw badRequest(`Request body must be a JSON object, got ${describe(body)}`);
    validateModelField(body, { servedModelNames: opts.servedModelNames });
    if (body.tokens === undefined) throw badRequest('`tokens` is required', 'tokens');
    const tokens = validateTokenIds(body.tokens, 'tokens', opts.engine.info.nVocab);
    return { prompt: opts.tokenText.detokenize(tokens) };
  };
}
