// HTTP routes of the CapRL workflows, on the serving app:
//   POST /v1/captions      images in (multipart/form-data uploads, or JSON image URLs), one
//                          caption (or n) per image out; the chat endpoint's validation, image
//                          rules and OpenAI error objects.
//   POST /v1/rewards/caprl CapRL's QA reward for captions, answered by the served model.
//   POST /get_reward       the same, shaped like CapRL's reward server ({"prompts": [[caption,
//                          [[question, answer], ...]], ...]} -> {"rewards": [...]}).
// Uploads are streamed through @fastify/multipart (registered in this plugin's scope only, so
// the other routes still take JSON alone) with limits on file size, file count and fields.
import { createHash, randomBytes } from 'node:crypto';
import multipart from '@fastify/multipart';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { EngineImage } from '../engine/native-types.js';
import { checkBearer, unauthorized } from '../serving/auth.js';
import type { ServingContext } from '../serving/context.js';
import { requestDeadline } from '../serving/deadline.js';
import { ApiError, badRequest, internalError, serviceUnavailable } from '../serving/errors.js';
import { SeedSource, addUsage, admitted } from '../serving/generation.js';
import { prepareImages } from '../serving/images.js';
import type { Usage } from '../serving/protocol.js';
import { describe, isObject, validateChatRequest, validateModelField } from '../serving/validate.js';
import { sniffImageFormat } from '../images/decode-data-uri.js';
import { EngineAnswerer, answerSettings } from './answerer.js';
import { DEFAULT_CAPTION_PROMPT, EngineCaptioner, type CaptionResult, type PreparedCaption } from './caption.js';
import { RecordError } from './errors.js';
import { QuestionFormatError, parseQuestion, type MultipleChoice } from './qa.js';
import { computeRewards, type RewardItem, type RewardResult } from './qa-reward.js';

export interface UploadLimits {
  /** Largest uploaded file, bytes (default 32 MiB). */
  fileSize?: number;
  /** Most files per request (default 16). */
  files?: number;
  /** Most non-file fields (default 64). */
  fields?: number;
  /** Largest non-file field value, bytes (default 64 KiB). */
  fieldSize?: number;
  /** Most bytes of files in one request (default 64 MiB, the JSON body limit). */
  totalSize?: number;
}

export const DEFAULT_UPLOAD_LIMITS: Required<UploadLimits> = { fileSize: 32 * 1024 * 1024, files: 16, fields: 64, fieldSize: 64 * 1024, totalSize: 64 * 1024 * 1024 };
/** Most answers one reward request may ask for. */
export const MAX_REWARD_ASKS = 65536;

export interface WorkflowRouteOptions extends ServingContext {
  uploadLimits?: UploadLimits;
  /** --api-key: /v1/* is checked by the app; /get_reward (outside /v1) is checked here. */
  apiKeys?: readonly string[];
}

/** Multipart fields that are numbers or booleans in a JSON request. */
const NUMBER_FIELDS = new Set([
  'max_tokens', 'max_completion_tokens', 'temperature', 'top_p', 'top_k', 'min_p', 'repetition_penalty',
  'presence_penalty', 'frequency_penalty', 'seed', 'n', 'min_tokens',
]);
const BOOLEAN_FIELDS = new Set(['ignore_eos', 'stream', 'logprobs']);
const LIST_FIELDS = new Set(['stop', 'stop_token_ids']);

/** A form field's text as the JSON value a chat request would carry ("0.5" -> 0.5), unchanged when it is not one. */
function coerceField(name: string, value: string): unknown {
  const v = value.trim();
  if (NUMBER_FIELDS.has(name) && v !== '' && Number.isFinite(Number(v))) return Number(v);
  if (BOOLEAN_FIELDS.has(name) && (v === 'true' || v === 'false')) return v === 'true';
  if (name === 'stop_token_ids' && /^-?\d+$/.test(v)) return Number(v);
  return value;
}

interface Upload {
  bytes: Buffer;
  filename: string;
  param: string;
}

function uploadError(err: unknown, limits: Required<UploadLimits>): ApiError | null {
  const code = (err as { code?: string }).code;
  switch (code) {
    case 'FST_REQ_FILE_TOO_LARGE':
      return new ApiError(413, `An uploaded file is larger than the ${limits.fileSize} byte limit`, 'invalid_request_error', 'file', 'file_too_large');
    case 'FST_FILES_LIMIT':
      return new ApiError(413, `At most ${limits.files} files may be uploaded in one request`, 'invalid_request_error', 'file', 'too_many_files');
    case 'FST_FIELDS_LIMIT':
    case 'FST_PARTS_LIMIT':
      return new ApiError(413, `Too many form fields (at most ${limits.fields})`, 'invalid_request_error', null, 'too_many_fields');
    case 'FST_PROTO_VIOLATION':
      return badRequest('prototype property is not allowed as field name');
    case 'FST_MP_PREMATURE_CLOSE':
      return badRequest('the request was closed before the multipart data was fully received');
    default:
      return null;
  }
}

/** Reads a multipart request: files (as they stream in, against the limits) and fields. */
async function readMultipart(request: FastifyRequest, limits: Required<UploadLimits>): Promise<{ fields: Record<string, unknown>; uploads: Upload[] }> {
  const fields: Record<string, unknown> = {};
  const uploads: Upload[] = [];
  let total = 0;
  try {
    for await (const part of request.parts({ limits: { fileSize: limits.fileSize, files: limits.files, fields: limits.fields, fieldSize: limits.fieldSize, parts: limits.files + limits.fields } })) {
      if (part.type === 'file') {
        const bytes = await part.toBuffer();
        total += bytes.length;
        if (total > limits.totalSize) {
          throw new ApiError(413, `The uploaded files are larger than the ${limits.totalSize} byte limit per request`, 'invalid_request_error', 'file', 'request_too_large');
        }
        uploads.push({ bytes, filename: part.filename, param: `${part.fieldname}[${uploads.length}]` });
        continue;
      }
      if (part.valueTruncated) {
        throw new ApiError(413, `Form field \`${part.fieldname}\` is larger than the ${limits.fieldSize} byte limit`, 'invalid_request_error', part.fieldname, 'field_too_large');
      }
      const value = coerceField(part.fieldname, String(part.value));
      if (LIST_FIELDS.has(part.fieldname)) {
        const prev = fields[part.fieldname];
        fields[part.fieldname] = Array.isArray(prev) ? [...prev, value] : [value];
      } else {
        fields[part.fieldname] = value;
      }
    }
  } catch (err) {
    throw uploadError(err, limits) ?? err;
  }
  return { fields, uploads };
}

export function newCaptionsId(): string {
  return `captions-${randomBytes(16).toString('hex')}`;
}

/** Runs `work` with an AbortSignal that fires when the client goes away before the reply. */
function clientSignal(reply: FastifyReply): AbortController {
  const ac = new AbortController();
  const res = reply.raw;
  res.once('close', () => {
    if (!res.writableEnded) ac.abort();
  });
  return ac;
}

export function registerWorkflowRoutes(app: FastifyInstance, opts: WorkflowRouteOptions): void {
  const { engine } = opts;
  const limits: Required<UploadLimits> = { ...DEFAULT_UPLOAD_LIMITS, ...opts.uploadLimits };
  const seeds = new SeedSource(opts.seed);
  const captioner = engine.info.hasVision
    ? new EngineCaptioner(engine, opts.servedModelNames[0]!, { imageOptions: opts.imageOptions })
    : null;

  app.register(async (scope) => {
    await scope.register(multipart, { limits: { fileSize: limits.fileSize, files: limits.files, fields: limits.fields, fieldSize: limits.fieldSize } });

    scope.post('/v1/captions', async (request, reply) => {
      if (!opts.isAccepting()) throw serviceUnavailable('The server is shutting down');
      const ac = clientSignal(reply);
      let fields: Record<string, unknown>;
      let uploads: Upload[] = [];
      let urls: { url: string; param: string }[] = [];
      if (request.isMultipart()) {
        ({ fields, uploads } = await readMultipart(request, limits));
      } else {
        if (!isObject(request.body)) throw badRequest(`Request body must be a JSON object or multipart/form-data, got ${describe(request.body)}`);
        fields = { ...request.body };
        const list = fields.images ?? (fields.image !== undefined ? [fields.image] : undefined);
        const param = fields.images !== undefined ? 'images' : 'image';
        if (list !== undefined) {
          if (!Array.isArray(list) || !list.every((u) => typeof u === 'string' || (isObject(u) && typeof u.url === 'string'))) {
            throw badRequest(`\`${param}\` must be an image URL or a list of them`, param);
          }
          urls = list.map((u, i) => ({ url: typeof u === 'string' ? u : (u as { url: string }).url, param: fields.images !== undefined ? `images[${i}]` : 'image' }));
        }
      }
      const prompt = fields.prompt ?? DEFAULT_CAPTION_PROMPT;
      if (typeof prompt !== 'string') throw badRequest(`\`prompt\` must be a string, got ${describe(prompt)}`, 'prompt');
      if (engine.info.mediaMarker && prompt.includes(engine.info.mediaMarker)) {
        throw badRequest(`\`prompt\` may not contain the reserved marker ${engine.info.mediaMarker}`, 'prompt');
      }
      const { prompt: _p, images: _i, image: _j, messages: _m, ...rest } = fields;
      const req = validateChatRequest({ ...rest, messages: [{ role: 'user', content: prompt }] }, {
        servedModelNames: opts.servedModelNames, nVocab: engine.info.nVocab, maxN: opts.maxNumSeqs,
      });
      if (req.stream) throw badRequest('`stream` is not supported by /v1/captions', 'stream');
      if (req.logprobs) throw badRequest('`logprobs` is not supported by /v1/captions', 'logprobs');
      const count = uploads.length + urls.length;
      if (count === 0) {
        throw badRequest(request.isMultipart()
          ? 'at least one image file is required (a multipart file field, e.g. -F file=@image.png)'
          : 'at least one image is required: `images` (a list of image URLs) or `image`', request.isMultipart() ? 'file' : 'images');
      }
      if (!captioner) {
        throw badRequest('image input is not supported: the server was started without a vision projector (--mmproj)', uploads[0]?.param ?? urls[0]?.param ?? null);
      }
      if (count > limits.files) throw badRequest(`At most ${limits.files} images per request, got ${count}`, 'images', 'too_many_images');

      // Every image is decoded before any generation starts: one bad image fails the request with
      // a 400 naming it, as in chat.
      const measure = async (image: Parameters<EngineCaptioner['prepare']>[0], param: string, name: string | null): Promise<PreparedCaption> => {
        try {
          return await captioner.prepare(image, prompt, req.maxTokens);
        } catch (err) {
          if (!(err instanceof RecordError)) throw err;
          throw badRequest(name ? `${name}: ${err.message}` : err.message, param, err.code);
        }
      };
      let preparedAll: PreparedCaption[];
      let filenames: (string | null)[];
      if (uploads.length > 0) {
        preparedAll = await Promise.all(uploads.map(async (u) => {
          const format = sniffImageFormat(u.bytes);
          if (!format) {
            throw badRequest(`${u.filename || 'the upload'} is not a PNG, JPEG, WebP or GIF image (unrecognised file signature)`, u.param, 'unsupported_image_format');
          }
          return measure({ bytes: u.bytes, format }, u.param, u.filename || null);
        }));
        filenames = uploads.map((u) => u.filename || null);
      } else {
        let imgs: EngineImage[];
        try {
          imgs = await prepareImages(urls, { imageOptions: opts.imageOptions, imageSource: opts.imageSource ?? {} }, ac.signal);
        } catch (err) {
          if (ac.signal.aborted) {
            reply.hijack();
            return undefined;
          }
          throw err;
        }
        preparedAll = await Promise.all(imgs.map((img, i) => measure(img, urls[i]!.param, null)));
        filenames = urls.map(() => null);
      }
      if (ac.signal.aborted) {
        reply.hijack();
        return undefined;
      }
      const created = Math.floor(Date.now() / 1000);
      const deadline = requestDeadline(request);
      const signal = AbortSignal.any([ac.signal, deadline]);
      const gens = preparedAll.map((p) => captioner.start(p, seeds.apply(req.sampling), req.n, undefined, signal));
      let results: CaptionResult[];
      try {
        // The engine counts each prompt with its image and checks it against the context: one it
        // refuses fails the request with a 400 (the first in order).
        const verdicts = await Promise.allSettled(gens.map((g) => admitted(g, { deadline, promptParam: 'prompt' })));
        const refused = verdicts.find((v) => v.status === 'rejected');
        if (refused) {
          for (const g of gens) g.cancel();
          throw refused.reason;
        }
        results = await Promise.all(gens.map((g) => captioner.collect(g)));
      } catch (err) {
        if (ac.signal.aborted) {
          reply.hijack();
          return undefined;
        }
        if (err instanceof RecordError) throw internalError(err.message);
        if (err instanceof ApiError) throw err;
        throw serviceUnavailable(`The request was aborted by the server: ${(err as Error).message}`);
      }
      let usage: Usage = { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 };
      const data = results.map((r, index) => {
        const u: Usage = { prompt_tokens: r.promptTokens, completion_tokens: r.completionTokens, total_tokens: r.promptTokens + r.completionTokens };
        usage = addUsage(usage, u);
        return {
          index,
          ...(filenames[index] !== null ? { filename: filenames[index] } : {}),
          caption: r.captions[0] ?? '',
          ...(req.n > 1 ? { captions: r.captions, finish_reasons: r.finishReasons } : {}),
          finish_reason: r.finishReasons[0] ?? null,
          usage: u,
        };
      });
      return reply.code(200).send({ id: newCaptionsId(), object: 'caption.list', created, model: req.model, data, usage });
    });
  });

  const rewardsHandler = (shape: 'caprl' | 'get_reward') => async (request: FastifyRequest, reply: FastifyReply) => {
    if (!opts.isAccepting()) throw serviceUnavailable('The server is shutting down');
    const body = request.body;
    if (!isObject(body)) throw badRequest(`Request body must be a JSON object, got ${describe(body)}`);
    const parsed = shape === 'caprl' ? parseRewardRequest(body, opts.servedModelNames) : parseGetRewardRequest(body);
    const answerer = new EngineAnswerer(engine, parsed.model ?? opts.servedModelNames[0]!, parsed.settings, { maxSeqs: opts.maxNumSeqs });
    const ac = clientSignal(reply);
    let results: RewardResult[];
    try {
      results = await computeRewards(parsed.items, answerer, { ...parsed.reward, signal: ac.signal, concurrency: 256 });
    } catch (err) {
      if (ac.signal.aborted) {
        reply.hijack();
        return undefined;
      }
      throw err;
    }
    const rewards = results.map((r) => r.reward);
    if (shape === 'get_reward') return reply.code(200).send({ rewards, qa_rewards: rewards });
    const usage = results.reduce<Usage>((u, r) => addUsage(u, {
      prompt_tokens: r.promptTokens, completion_tokens: r.completionTokens, total_tokens: r.promptTokens + r.completionTokens,
    }), { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 });
    return reply.code(200).send({
      object: 'caprl.reward',
      model: parsed.model,
      rewards,
      data: results.map((r, index) => ({
        index, reward: r.reward, correct: r.correct, total: r.total, ...(parsed.returnDetails ? { details: r.details } : {}),
      })),
      usage,
    });
  };
  app.post('/v1/rewards/caprl', rewardsHandler('caprl'));
  // It generates like /v1/*, so it takes the same key when there is one.
  const keys = (opts.apiKeys ?? []).filter((k) => k !== '').map((k) => createHash('sha256').update(k, 'utf8').digest());
  app.post('/get_reward', {
    onRequest: async (request, reply) => {
      if (keys.length === 0 || checkBearer(request.headers.authorization, keys)) return;
      await reply.code(401).header('www-authenticate', 'Bearer').type('application/json').send(unauthorized().toJSON());
    },
  }, rewardsHandler('get_reward'));
}

interface ParsedReward {
  model: string | undefined;
  items: RewardItem[];
  reward: { seed: number; samplesPerQuestion: number; questionsPerCaption?: number; shuffle: boolean };
  settings: ReturnType<typeof answerSettings>;
  returnDetails: boolean;
}

function intField(body: Record<string, unknown>, field: string, min: number, max: number): number | undefined {
  const v = body[field];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw badRequest(`\`${field}\` must be an integer in [${min}, ${max}], got ${JSON.stringify(v)}`, field);
  }
  return v;
}

function boolField(body: Record<string, unknown>, field: string): boolean | undefined {
  const v = body[field];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'boolean') throw badRequest(`\`${field}\` must be a boolean, got ${describe(v)}`, field);
  return v;
}

function question(q: unknown, param: string): MultipleChoice {
  if (!isObject(q)) throw badRequest(`\`${param}\` must be an object {question, options?, answer}, got ${describe(q)}`, param);
  try {
    return parseQuestion({ question: q.question, options: q.options, answer: q.answer });
  } catch (err) {
    if (err instanceof QuestionFormatError) throw badRequest(err.message, `${param}.${err.field}`);
    throw err;
  }
}

function questionList(v: unknown, param: string): MultipleChoice[] {
  if (!Array.isArray(v) || v.length === 0) throw badRequest(`\`${param}\` must be a non-empty list of questions`, param);
  return v.map((q, j) => question(q, `${param}[${j}]`));
}

function settingsFrom(body: Record<string, unknown>): ReturnType<typeof answerSettings> {
  for (const f of ['temperature', 'top_p', 'max_tokens']) {
    const v = body[f];
    if (v !== undefined && v !== null && typeof v !== 'number') throw badRequest(`\`${f}\` must be a number, got ${describe(v)}`, f);
  }
  return answerSettings({
    temperature: body.temperature as number | undefined,
    topP: body.top_p as number | undefined,
    maxTokens: body.max_tokens as number | undefined,
  });
}

function checkSize(items: RewardItem[], samples: number, perCaption: number | undefined): void {
  const asks = items.reduce((s, it) => s + (perCaption ?? it.questions.length) * samples, 0);
  if (asks > MAX_REWARD_ASKS) throw badRequest(`the request asks ${asks} questions; at most ${MAX_REWARD_ASKS} per request`, 'items');
}

/** POST /v1/rewards/caprl: {items: [{caption, questions}]} or {captions, questions} (shared). */
export function parseRewardRequest(body: Record<string, unknown>, servedModelNames: readonly string[]): ParsedReward {
  const model = validateModelField(body, { servedModelNames });
  let items: RewardItem[];
  if (body.items !== undefined) {
    if (!Array.isArray(body.items) || body.items.length === 0) throw badRequest('`items` must be a non-empty list of {caption, questions}', 'items');
    items = body.items.map((it, i) => {
      if (!isObject(it)) throw badRequest(`\`items[${i}]\` must be an object {caption, questions}`, `items[${i}]`);
      if (typeof it.caption !== 'string') throw badRequest(`\`items[${i}].caption\` must be a string`, `items[${i}].caption`);
      return { caption: it.caption, questions: questionList(it.questions, `items[${i}].questions`) };
    });
  } else if (body.captions !== undefined) {
    if (!Array.isArray(body.captions) || body.captions.length === 0 || !body.captions.every((c) => typeof c === 'string')) {
      throw badRequest('`captions` must be a non-empty list of strings', 'captions');
    }
    const qs = questionList(body.questions, 'questions');
    items = (body.captions as string[]).map((caption) => ({ caption, questions: qs }));
  } else {
    throw badRequest('give `items` ([{caption, questions}]) or `captions` with shared `questions`', 'items');
  }
  const samplesPerQuestion = intField(body, 'samples_per_question', 1, 64) ?? 1;
  const questionsPerCaption = intField(body, 'questions_per_caption', 1, 1024);
  checkSize(items, samplesPerQuestion, questionsPerCaption);
  return {
    model,
    items,
    reward: {
      seed: intField(body, 'seed', 0, Number.MAX_SAFE_INTEGER) ?? 0,
      samplesPerQuestion,
      questionsPerCaption,
      shuffle: boolField(body, 'shuffle_options') ?? false,
    },
    settings: settingsFrom(body),
    returnDetails: boolField(body, 'return_details') ?? false,
  };
}

/**
 * POST /get_reward, CapRL's reward-server request: {"prompts": [[caption, [[question, answer],
 * ...]], ...], "qa_num"?, "all_qa"?, "shuffle_qa"?, "seed"?}. Questions carry their options as
 * lines ("   - A) ..."). Every question once unless qa_num is given (then drawn with
 * replacement, as CapRL's default), options shuffled when shuffle_qa.
 */
export function parseGetRewardRequest(body: Record<string, unknown>): ParsedReward {
  const prompts = body.prompts;
  if (!Array.isArray(prompts) || prompts.length === 0) throw badRequest('`prompts` must be a non-empty list of [caption, [[question, answer], ...]]', 'prompts');
  const items: RewardItem[] = prompts.map((p, i) => {
    const param = `prompts[${i}]`;
    if (!Array.isArray(p) || p.length !== 2 || typeof p[0] !== 'string' || !Array.isArray(p[1]) || p[1].length === 0) {
      throw badRequest(`\`${param}\` must be [caption, [[question, answer], ...]]`, param);
    }
    const questions = (p[1] as unknown[]).map((qa, j) => {
      if (!Array.isArray(qa) || qa.length < 2) throw badRequest(`\`${param}[1][${j}]\` must be [question, answer]`, `${param}[1][${j}]`);
      return question({ question: qa[0], answer: qa[1] }, `${param}[1][${j}]`);
    });
    return { caption: p[0] as string, questions };
  });
  const allQa = boolField(body, 'all_qa');
  const qaNum = intField(body, 'qa_num', 1, 1024);
  const questionsPerCaption = allQa === true ? undefined : qaNum;
  checkSize(items, 1, questionsPerCaption);
  return {
    model: undefined,
    items,
    reward: {
      seed: intField(body, 'seed', 0, Number.MAX_SAFE_INTEGER) ?? 0,
      samplesPerQuestion: 1,
      questionsPerCaption,
      shuffle: boolField(body, 'shuffle_qa') ?? false,
    },
    settings: settingsFrom(body),
    returnDetails: false,
  };
}
