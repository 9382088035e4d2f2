// The answerer of Prism and of CapRL's QA reward: a language model that sees only a caption and
// a multiple-choice question, and picks an option. Either a GGUF model in our engine (the
// prompt goes through the model's chat template, and the reply is primed with "The answer is",
// as CapRL's reward server primes it), or any OpenAI-compatible server (a chat request; the
// instruction asks for "The answer is X.").
import type { Engine } from '../engine/engine.js';
import type { SamplingParams } from '../engine/native-types.js';
import { choiceFailure, collectChoices, startGeneration } from '../serving/generation.js';
import { toTemplateMessages } from '../serving/prompt.js';
import { samplingSettings, type SamplingSettings } from './caption.js';
import type { EndpointPool } from './endpoints.js';
import { RecordError, errorMessage } from './errors.js';

/** CapRL's reward-server sampling for the answerer. */
export const ANSWER_DEFAULTS = { temperature: 0.6, topP: 1.0, maxTokens: 10 } as const;
/** Endpoint answerers reply unprimed, so they get more room. */
export const ENDPOINT_ANSWER_MAX_TOKENS = 32;
export const ANSWER_PREFIX = 'The answer is';

/** The user message: instructions, two worked examples, then the caption and the question. */
export function answerPrompt(caption: string, question: string): string {
  return [
    'You are given a caption that describes an image, and a multiple-choice question about that image.',
    'Answer the question using only what the caption states or clearly implies, even when the answer seems',
    'obvious from general knowledge or from the wording of the question. If the caption does not contain the',
    'answer, choose the option "Can not answer based on the caption".',
    '',
    'Example 1:',
    'Caption: <Caption Start> A girl in a yellow raincoat holds a blue umbrella on a rainy street. <Caption End>',
    'Question: What color is the umbrella?',
    '   - A) Red',
    '   - B) Blue',
    '   - C) Yellow',
    '   - D) Green',
    '   - E) Can not answer based on the caption',
    '',
    'The answer is B.',
    '',
    'Example 2:',
    'Caption: <Caption Start> Two men are playing chess at a table in a park. <Caption End>',
    'Question: At what time does the park close?',
    '   - A) 6 pm',
    '   - B) 8 pm',
    '   - C) 10 pm',
    '   - D) Midnight',
    '   - E) Can not answer based on the caption',
    '',
    'The answer is E.',
    '',
    'Now answer the question based on the following caption. Reply with "The answer is" and the letter of one option.',
    '',
    `Caption: <Caption Start> ${caption} <Caption End>`,
    `Question: ${question}`,
  ].join('\n');
}

export interface AnswerResult {
  /** The reply (after the prefix, for a primed engine answerer). */
  text: string;
  promptTokens: number;
  completionTokens: number;
}

export interface Answerer {
  readonly name: string;
  readonly defaultConcurrency: number;
  /** Throws RecordError when this question cannot be asked (e.g. the caption does not fit the context). */
  answer(caption: string, question: string, seed: number, signal?: AbortSignal): Promise<AnswerResult>;
}

export interface AnswerSettingsInput {
  temperature?: number;
  topP?: number;
  maxTokens?: number;
}

/** Validated like a chat request's fields (ApiError on a bad value). */
export function answerSettings(s: AnswerSettingsInput, defaultMaxTokens: number = ANSWER_DEFAULTS.maxTokens): SamplingSettings {
  return samplingSettings({
    temperature: s.temperature ?? ANSWER_DEFAULTS.temperature,
    top_p: s.topP ?? ANSWER_DEFAULTS.topP,
    max_tokens: s.maxTokens ?? defaultMaxTokens,
  });
}

/** A model in our engine (a text GGUF; a vision model's text side works too). */
export class EngineAnswerer implements Answerer {
  readonly defaultConcurrency: number;
  private readonly prefix: string;

  constructor(
    private readonly engine: Engine,
    readonly name: string,
    private readonly settings: SamplingSettings = answerSettings({}),
    opts: { maxSeqs?: number; prefix?: string } = {},
  ) {
    this.defaultConcurrency = 4 * (opts.maxSeqs ?? 16);
    this.prefix = opts.prefix ?? ANSWER_PREFIX;
  }

  async answer(caption: string, question: string, seed: number, signal?: AbortSignal): Promise<AnswerResult> {
    let prompt: string;
    try {
      const { templateMessages } = toTemplateMessages(
        [{ role: 'user', parts: [{ type: 'text', text: answerPrompt(caption, question) }] }],
        this.engine.info.mediaMarker,
      );
      prompt = this.engine.applyChatTemplate(templateMessages, true) + this.prefix;
    } catch (err) {
      throw new RecordError(`could not build the answerer prompt: ${errorMessage(err)}`, 'invalid_prompt', { cause: err });
    }
    // max_tokens unset: the rest of the context (the engine counts the prompt and checks it).
    const sampling: SamplingParams = { ...this.settings.sampling, maxTokens: this.settings.maxTokens ?? -1, seed };
    const gen = startGeneration(this.engine, { prompt, images: [], sampling, n: 1 }, signal ?? new AbortController().signal);
    const [c] = await collectChoices(gen);
    if (!c || c.finish.reason === 'abort') throw new Error('the answer was cancelled');
    const failed = choiceFailure(c.finish);
    if (failed) throw new RecordError(failed.message, failed.status === 400 ? failed.code : 'generation_failed');
    return { text: c.text, promptTokens: c.finish.promptTokens, completionTokens: c.finish.completionTokens };
  }
}

/** Any OpenAI-compatible server. */
export class EndpointAnswerer implements Answerer {
  readonly defaultConcurrency: number;

  constructor(
    private readonly pool: EndpointPool,
    readonly name: string,
    private readonly settings: SamplingSettings = answerSettings({}, ENDPOINT_ANSWER_MAX_TOKENS),
    private readonly servedName?: string,
  ) {
    this.defaultConcurrency = 16 * pool.size;
  }

  async answer(caption: string, question: string, seed: number, signal?: AbortSignal): Promise<AnswerResult> {
    const r = await this.pool.chat({
      ...this.settings.fields,
      ...(this.servedName ? { model: this.servedName } : {}),
      seed,
      messages: [{ role: 'user', content: answerPrompt(caption, question) }],
    }, signal);
    const text = r.choices?.[0]?.message?.content;
    if (typeof text !== 'string') throw new RecordError('the answerer replied without a message', 'bad_response');
    return { text, promptTokens: r.usage?.prompt_tokens ?? 0, completionTokens: r.usage?.completion_tokens ?? 0 };
  }
}
