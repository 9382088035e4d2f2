// Chat-completion request validation and defaulting, vLLM's semantics: unknown fields are
// ignored, fields that would change the output in ways we cannot honour yet are refused (400),
// out-of-range values are refused with `param` naming the field, and absent sampling fields
// take vLLM's defaults (temperature 1, top_p 1, top_k off, min_p 0, penalties neutral).
// max_tokens is settled by the engine, which counts the prompt (unset: the rest of the context).
import type { SamplingParams } from '../engine/native-types.js';
import { badRequest, modelNotFound } from './errors.js';

export type PromptPart =
  | { type: 'text'; text: string }
  /** `param` is where the image sits in the request, for error messages. */
  | { type: 'image'; url: string; param: string };

export interface ValidatedMessage {
  role: 'system' | 'user' | 'assistant';
  parts: PromptPart[];
}

/** What chat and text completions share: model, sampling, n, streaming. */
export interface ValidatedGenerationFields {
  /** The served model name to report back. */
  model: string;
  /** Everything but maxTokens (0 here), settled with the engine (unset: -1, the rest of the context); logprobs set by the caller. */
  sampling: SamplingParams;
  /** max_completion_tokens ?? max_tokens; null = fill the rest of the context (vLLM). */
  maxTokens: number | null;
  /** Choices per prompt, sampled from one shared prefill. */
  n: number;
  stream: boolean;
  includeUsage: boolean;
}

export interface ValidatedChatRequest extends ValidatedGenerationFields {
  messages: ValidatedMessage[];
  /** Whether choice.logprobs is returned, and how many alternatives per token. */
  logprobs: boolean;
  topLogprobs: number;
  /** vLLM extension; default true. */
  addGenerationPrompt: boolean;
}

export interface ValidationContext {
  /** Names this server answers to; the first is the default when `model` is absent. */
  servedModelNames: readonly string[];
  /** Token ids in stop_token_ids must be below this, when known. */
  nVocab?: number;
  /** Highest top_logprobs accepted (vLLM's max_logprobs default: 20). */
  maxLogprobs?: number;
  /** Highest `n` accepted (the engine's sequence slots, --max-num-seqs); default unlimited. */
  maxN?: number;
}

/** Greedy below this temperature, as vLLM (_SAMPLING_EPS). */
const SAMPLING_EPS = 1e-5;
const SEED_MODULUS = 2 ** 31;

type Json = Record<string, unknown>;

export function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

export function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  return typeof v === 'string' ? 'a string' : typeof v;
}

export interface NumberRule {
  integer?: boolean;
  min?: number;
  max?: number;
  /** min is exclusive. */
  gt?: boolean;
  /** Appended to the range error message. */
  rangeText: string;
}

/** A numeric field; null/undefined -> undefined. */
export function num(body: Json, field: string, rule: NumberRule): number | undefined {
  const v = body[field];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isFinite(v)) {
    throw badRequest(`\`${field}\` must be a ${rule.integer ? 'integer' : 'number'}, got ${describe(v)}`, field);
  }
  if (rule.integer && !Number.isInteger(v)) {
    throw badRequest(`\`${field}\` must be an integer, got ${v}`, field);
  }
  const belowMin = rule.min !== undefined && (rule.gt ? v <= rule.min : v < rule.min);
  const aboveMax = rule.max !== undefined && v > rule.max;
  if (belowMin || aboveMax) throw badRequest(`\`${field}\` ${rule.rangeText}, got ${v}`, field);
  return v;
}

export function bool(body: Json, field: string): boolean | undefined {
  const v = body[field];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'boolean') throw badRequest(`\`${field}\` must be a boolean, got ${describe(v)}`, field);
  return v;
}

/** Fields that would change the output in ways not supported yet: refused rather than ignored. */
export const UNSUPPORTED: { field: string; isSet: (v: unknown) => boolean; why: string }[] = [
  { field: 'tools', isSet: (v) => Array.isArray(v) && v.length > 0, why: 'tool calling is not supported' },
  { field: 'functions', isSet: (v) => Array.isArray(v) && v.length > 0, why: 'function calling is not supported' },
  {
    field: 'response_format',
    isSet: (v) => isObject(v) && v.type !== undefined && v.type !== 'text',
    why: 'structured output (response_format other than "text") is not supported',
  },
  { field: 'logit_bias', isSet: (v) => isObject(v) && Object.keys(v).length > 0, why: '`logit_bias` is not supported' },
  { field: 'best_of', isSet: (v) => typeof v === 'number' && v > 1, why: '`best_of` > 1 is not supported' },
  { field: 'use_beam_search', isSet: (v) => v === true, why: 'beam search is not supported' },
  { field: 'echo', isSet: (v) => v === true, why: '`echo` is not supported' },
  { field: 'continue_final_message', isSet: (v) => v === true, why: '`continue_final_message` is not supported' },
  { field: 'prompt_logprobs', isSet: (v) => v !== undefined && v !== null, why: '`prompt_logprobs` is not supported' },
  { field: 'chat_template', isSet: (v) => v !== undefined && v !== null, why: 'a per-request `chat_template` is not supported' },
  { field: 'guided_json', isSet: (v) => v !== undefined && v !== null, why: 'guided decoding is not supported' },
  { field: 'guided_regex', isSet: (v) => v !== undefined && v !== null, why: 'guided decoding is not supported' },
  { field: 'guided_choice', isSet: (v) => v !== undefined && v !== null, why: 'guided decoding is not supported' },
  { field: 'guided_grammar', isSet: (v) => v !== undefined && v !== null, why: 'guided decoding is not supported' },
  { field: 'structured_outputs', isSet: (v) => v !== undefined && v !== null, why: 'structured outputs are not supported' },
];

const ROLE_MAP: Record<string, ValidatedMessage['role']> = {
  system: 'system',
  developer: 'system',
  user: 'user',
  assistant: 'assistant',
};

export function validateMessages(v: unknown): ValidatedMessage[] {
  if (v === undefined || v === null) throw badRequest('`messages` is required', 'messages');
  if (!Array.isArray(v)) throw badRequest(`\`messages\` must be an array, got ${describe(v)}`, 'messages');
  if (v.length === 0) throw badRequest('`messages` must contain at least one message', 'messages');
  return v.map((m, i) => {
    const p = `messages[${i}]`;
    if (!isObject(m)) throw badRequest(`\`${p}\` must be an object, got ${describe(m)}`, p);
    const roleRaw = m.role;
    if (typeof roleRaw !== 'string') throw badRequest(`\`${p}.role\` is required and must be a string`, `${p}.role`);
    const role = ROLE_MAP[roleRaw];
    if (!role) {
      throw badRequest(
        `\`${p}.role\` "${roleRaw}" is not supported; use one of system, developer, user, assistant`,
        `${p}.role`,
      );
    }
    const content = m.content;
    if (content === undefined || content === null) {
      if (role === 'assistant') return { role, parts: [] };
      throw badRequest(`\`${p}.content\` is required`, `${p}.content`);
    }
    if (typeof content === 'string') return { role, parts: [{ type: 'text', text: content }] };
    if (!Array.isArray(content)) {
      throw badRequest(`\`${p}.content\` must be a string or an array of content parts, got ${describe(content)}`, `${p}.content`);
    }
    const parts: PromptPart[] = content.map((part, j) => {
      const pp = `${p}.content[${j}]`;
      if (!isObject(part)) throw badRequest(`\`${pp}\` must be an object, got ${describe(part)}`, pp);
      if (part.type === 'text') {
        if (typeof part.text !== 'string') throw badRequest(`\`${pp}.text\` must be a string`, `${pp}.text`);
        return { type: 'text', text: part.text };
      }
      if (part.type === 'image_url') {
        const iu = part.image_url;
        const url = typeof iu === 'string' ? iu : isObject(iu) ? iu.url : undefined;
        if (typeof url !== 'string' || url.length === 0) {
          throw badRequest(`\`${pp}.image_url.url\` is required and must be a string`, `${pp}.image_url.url`);
        }
        return { type: 'image', url, param: `${pp}.image_url.url` };
      }
      throw badRequest(
        `\`${pp}.type\` ${typeof part.type === 'string' ? `"${part.type}"` : 'missing'} is not supported; use "text" or "image_url"`,
        `${pp}.type`,
      );
    });
    return { role, parts };
  });
}

function validateStop(v: unknown): string[] {
  if (v === undefined || v === null) return [];
  const list = typeof v === 'string' ? [v] : v;
  if (!Array.isArray(list) || !list.every((s) => typeof s === 'string')) {
    throw badRequest('`stop` must be a string or an array of strings', 'stop');
  }
  if (list.some((s) => s.length === 0)) throw badRequest('`stop` cannot contain an empty string', 'stop');
  return list as string[];
}

function validateStopTokenIds(v: unknown, nVocab: number | undefined): number[] {
  if (v === undefined || v === null) return [];
  if (!Array.isArray(v)) throw badRequest('`stop_token_ids` must be an array of integers', 'stop_token_ids');
  for (const id of v) {
    if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || (nVocab !== undefined && id >= nVocab)) {
      throw badRequest(
        `\`stop_token_ids\` must hold token ids in [0, ${nVocab !== undefined ? nVocab - 1 : 'vocab size)'}${nVocab !== undefined ? ']' : ''}, got ${JSON.stringify(id)}`,
        'stop_token_ids',
      );
    }
  }
  return v as number[];
}

/** `model`: absent -> the default served name (vLLM); unknown -> 404 (vLLM's NotFoundError). */
export function validateModelField(body: Json, ctx: ValidationContext): string {
  const modelRaw = body.model;
  if (modelRaw === undefined || modelRaw === null || modelRaw === '') return ctx.servedModelNames[0]!;
  if (typeof modelRaw !== 'string') throw badRequest(`\`model\` must be a string, got ${describe(modelRaw)}`, 'model');
  if (!ctx.servedModelNames.includes(modelRaw)) throw modelNotFound(modelRaw);
  return modelRaw;
}

/**
 * The fields chat and text completions share: model, the fields refused outright, n, token
 * budget, sampling (vLLM's defaults), stop conditions, streaming, and the accepted no-ops
 * (`user`, `skip_special_tokens`). logprobs are the caller's (their shape differs).
 */
export function validateGenerationFields(body: Json, ctx: ValidationContext): ValidatedGenerationFields {
  const model = validateModelField(body, ctx);

  for (const u of UNSUPPORTED) {
    if (u.isSet(body[u.field])) throw badRequest(`${u.why} by this server`, u.field);
  }

  const maxN = ctx.maxN;
  const n = num(body, 'n', {
    integer: true, min: 1, max: maxN,
    rangeText: maxN !== undefined ? `must be in [1, ${maxN}] (at most --max-num-seqs choices per request)` : 'must be at least 1',
  }) ?? 1;

  const maxCompletion = num(body, 'max_completion_tokens', { integer: true, min: 1, rangeText: 'must be at least 1' });
  const maxTokensLegacy = num(body, 'max_tokens', { integer: true, min: 1, rangeText: 'must be at least 1' });
  const maxTokens = maxCompletion ?? maxTokensLegacy ?? null;

  let temperature = num(body, 'temperature', { min: 0, rangeText: 'must be non-negative' }) ?? 1.0;
  let topP = num(body, 'top_p', { min: 0, gt: true, max: 1, rangeText: 'must be in (0, 1]' }) ?? 1.0;
  let topK = num(body, 'top_k', { integer: true, min: -1, rangeText: 'must be -1 or 0 (disabled), or at least 1' }) ?? 0;
  let minP = num(body, 'min_p', { min: 0, max: 1, rangeText: 'must be in [0, 1]' }) ?? 0;
  const repetitionPenalty =
    num(body, 'repetition_penalty', { min: 0, gt: true, rangeText: 'must be greater than zero' }) ?? 1.0;
  const presencePenalty = num(body, 'presence_penalty', { min: -2, max: 2, rangeText: 'must be in [-2, 2]' }) ?? 0;
  const frequencyPenalty = num(body, 'frequency_penalty', { min: -2, max: 2, rangeText: 'must be in [-2, 2]' }) ?? 0;
  const seedRaw = num(body, 'seed', {
    integer: true, min: Number.MIN_SAFE_INTEGER, max: Number.MAX_SAFE_INTEGER, rangeText: 'must be a safe integer',
  });
  const minTokens = num(body, 'min_tokens', { integer: true, min: 0, rangeText: 'must be non-negative' }) ?? 0;
  if (maxTokens !== null && minTokens > maxTokens) {
    throw badRequest(`\`min_tokens\` must be less than or equal to max_tokens=${maxTokens}, got ${minTokens}`, 'min_tokens');
  }
  const ignoreEos = bool(body, 'ignore_eos') ?? false;
  const stop = validateStop(body.stop);
  const stopTokenIds = validateStopTokenIds(body.stop_token_ids, ctx.nVocab);
  // Accepted as vLLM does; special tokens never reach the output text here, so `false` changes nothing.
  bool(body, 'skip_special_tokens');
  const user = body.user;
  if (user !== undefined && user !== null && typeof user !== 'string') {
    throw badRequest(`\`user\` must be a string, got ${describe(user)}`, 'user');
  }

  const stream = bool(body, 'stream') ?? false;
  let includeUsage = false;
  const so = body.stream_options;
  if (so !== undefined && so !== null) {
    if (!stream) throw badRequest('`stream_options` can only be set when `stream` is true', 'stream_options');
    if (!isObject(so)) throw badRequest(`\`stream_options\` must be an object, got ${describe(so)}`, 'stream_options');
    const iu = so.include_usage;
    if (iu !== undefined && iu !== null && typeof iu !== 'boolean') {
      throw badRequest('`stream_options.include_usage` must be a boolean', 'stream_options.include_usage');
    }
    includeUsage = iu === true;
  }

  // vLLM: below _SAMPLING_EPS the request is greedy and the truncation samplers are off.
  if (temperature < SAMPLING_EPS) {
    temperature = 0;
    topP = 1.0;
    topK = 0;
    minP = 0;
  }
  // The engine's seed is an int with -1 meaning "random": fold any integer into [0, 2^31).
  const seed = seedRaw === undefined ? -1 : ((seedRaw % SEED_MODULUS) + SEED_MODULUS) % SEED_MODULUS;

  return {
    model,
    sampling: {
      temperature,
      topP,
      topK: topK <= 0 ? 0 : topK,
      minP,
      repetitionPenalty,
      presencePenalty,
      frequencyPenalty,
      seed,
      maxTokens: 0,
      minTokens,
      ignoreEos,
      stop,
      stopTokenIds,
      logprobs: -1,
    },
    maxTokens,
    n,
    stream,
    includeUsage,
  };
}

/** Validates a parsed chat-completions body; throws ApiError (400, or 404 for an unknown model). */
export function validateChatRequest(body: unknown, ctx: ValidationContext): ValidatedChatRequest {
  if (!isObject(body)) throw badRequest(`Request body must be a JSON object, got ${describe(body)}`);
  const common = validateGenerationFields(body, ctx);
  const messages = validateMessages(body.messages);

  const logprobs = bool(body, 'logprobs') ?? false;
  const maxLogprobs = ctx.maxLogprobs ?? 20;
  const topLogprobsRaw = num(body, 'top_logprobs', {
    integer: true, min: 0, max: maxLogprobs, rangeText: `must be in [0, ${maxLogprobs}]`,
  });
  if (topLogprobsRaw !== undefined && !logprobs) {
    throw badRequest('when using `top_logprobs`, `logprobs` must be set to true', 'top_logprobs');
  }
  const topLogprobs = topLogprobsRaw ?? 0;
  const addGenerationPrompt = bool(body, 'add_generation_prompt') ?? true;

  return {
    ...common,
    sampling: { ...common.sampling, logprobs: logprobs ? topLogprobs : -1 },
    messages,
    logprobs,
    topLogprobs,
    addGenerationPrompt,
  };
}

