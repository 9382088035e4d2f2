// CapRL's QA reward: for each caption, the answerer answers questions about the image from the
// caption alone; the reward is the fraction answered correctly. Each question is asked
// `samplesPerQuestion` times (optionally with its options shuffled), either every question once
// per sample or `questionsPerCaption` questions drawn with replacement (CapRL's qa_num). Every
// random choice (questions drawn, option orders, answerer seeds) derives from the run seed and
// the item's key, so a request gives the same rewards whatever the concurrency.
import type { Answerer } from './answerer.js';
import { RecordError, errorMessage } from './errors.js';
import { runPool, withLinkedSignal } from './pool.js';
import { CANNOT_ANSWER, keyedSeed, meanAccuracy, parseAnswerLetter, renderQuestion, shuffleQuestion, type MultipleChoice } from './qa.js';
import { Xoshiro128 } from '../model/prng.js';

export interface RewardItem {
  caption: string;
  questions: MultipleChoice[];
  /** Seeds derive from this (default: the item's index). */
  key?: string;
}

export interface RewardOptions {
  seed: number;
  /** Times each drawn question is asked (default 1). */
  samplesPerQuestion?: number;
  /** Questions drawn with replacement per caption; absent = every question once. */
  questionsPerCaption?: number;
  /** Shuffle the options of each ask (seeded). */
  shuffle?: boolean;
  /** Answers in flight (default: the answerer's). */
  concurrency?: number;
  signal?: AbortSignal;
}

export interface Ask {
  item: number;
  /** Index of the question in the item. */
  question: number;
  /** Which draw of this item (0..) */
  slot: number;
  sample: number;
  /** The question as asked (options possibly shuffled), "can not answer" last. */
  text: string;
  letters: string;
  options: string[];
  expected: string;
  cannotAnswer: string;
  seed: number;
}

export interface AnswerDetail {
  question: number;
  sample: number;
  asked: string;
  expected: string;
  predicted: string | null;
  correct: boolean;
  response: string;
  error?: string;
}

export interface RewardResult {
  /** Fraction correct (0 when nothing could be asked). */
  reward: number;
  correct: number;
  total: number;
  details: AnswerDetail[];
  promptTokens: number;
  completionTokens: number;
}

/** Every question to ask, in a fixed order, with its seeded shuffle and answerer seed. */
export function planAsks(items: readonly RewardItem[], o: RewardOptions): Ask[] {
  const samples = o.samplesPerQuestion ?? 1;
  const asks: Ask[] = [];
  items.forEach((it, i) => {
    const key = it.key ?? String(i);
    let drawn: number[];
    if (o.questionsPerCaption !== undefined) {
      const rng = new Xoshiro128(o.seed, `draw:${key}`);
      drawn = Array.from({ length: o.questionsPerCaption }, () => Math.floor((rng.nextU32() / 0x100000000) * it.questions.length));
    } else {
      drawn = it.questions.map((_, q) => q);
    }
    drawn.forEach((q, slot) => {
      for (let s = 0; s < samples; s++) {
        const askKey = `${key}/${slot}/${s}`;
        const mc = o.shuffle ? shuffleQuestion(it.questions[q]!, o.seed, askKey) : it.questions[q]!;
        const r = renderQuestion(mc);
        asks.push({
          item: i, question: q, slot, sample: s, text: r.text, letters: r.letters, options: [...mc.options, CANNOT_ANSWER],
          expected: r.answer, cannotAnswer: r.cannotAnswer, seed: keyedSeed(o.seed, askKey),
        });
      }
    });
  });
  return asks;
}

/** Scores one reply: the letter it gives (null: none) and whether it is the expected one. */
export function scoreReply(ask: Pick<Ask, 'letters' | 'options' | 'expected'>, reply: string): { predicted: string | null; correct: boolean } {
  const predicted = parseAnswerLetter(reply, ask.letters, ask.options);
  return { predicted, correct: predicted === ask.expected };
}

/** Rewards per item from the answers (in `asks` order): fraction correct. */
export function aggregateRewards(itemCount: number, asks: readonly Ask[], answers: readonly AnswerDetail[]): RewardResult[] {
  const out: RewardResult[] = Array.from({ length: itemCount }, () => ({
    reward: 0, correct: 0, total: 0, details: [], promptTokens: 0, completionTokens: 0,
  }));
  asks.forEach((a, k) => {
    const r = out[a.item]!;
    const d = answers[k]!;
    r.details.push(d);
    r.total++;
    if (d.correct) r.correct++;
  });
  for (const r of out) r.reward = meanAccuracy(r.details.map((d) => d.correct));
  return out;
}

/** Asks every planned question and returns each item's reward. A question that cannot be asked counts as wrong. */
export async function computeRewards(items: readonly RewardItem[], answerer: Answerer, o: RewardOptions): Promise<RewardResult[]> {
  const asks = planAsks(items, o);
  const answers: AnswerDetail[] = new Array(asks.length);
  const tokens = asks.map(() => ({ p: 0, c: 0 }));
  await runPool(asks.map((a, k) => ({ a, k })), o.concurrency ?? answerer.defaultConcurrency, async ({ a, k }) => {
    const base = { question: a.question, sample: a.sample, asked: a.text, expected: a.expected };
    try {
      const r = await withLinkedSignal(o.signal, (signal) => answerer.answer(items[a.item]!.caption, a.text, a.seed, signal));
      tokens[k] = { p: r.promptTokens, c: r.completionTokens };
      answers[k] = { ...base, ...scoreReply(a, r.text), response: r.text };
    } catch (err) {
      if (!(err instanceof RecordError)) throw err;
      answers[k] = { ...base, predicted: null, correct: false, response: '', error: errorMessage(err) };
    }
  }, o.signal);
  if (o.signal?.aborted) throw new Error('cancelled');
  const results = aggregateRewards(items.length, asks, answers);
  asks.forEach((a, k) => {
    results[a.item]!.promptTokens += tokens[k]!.p;
    results[a.item]!.completionTokens += tokens[k]!.c;
  });
  return results;
}
