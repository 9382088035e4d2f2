// Multiple-choice questions as Prism and CapRL's QA reward use them: parsing (options in the
// question text, "   - A) ..." / "A. ..." / "(A) ..." lines, or a separate `options` list or
// map), rendering with the "Can not answer based on the caption" option added last, seeded
// option shuffles, reading the answerer's letter, and the scores (accuracy, best-of-n).
import { Xoshiro128 } from '../model/prng.js';

export const LETTERS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ';
export const CANNOT_ANSWER = 'Can not answer based on the caption';

export interface MultipleChoice {
  /** The question without its options. */
  stem: string;
  /** Option texts, without letters and without a "can not answer" option. */
  options: string[];
  /** Index of the correct option; -1 when the correct answer is "can not answer". */
  answer: number;
}

export class QuestionFormatError extends Error {
  /** `field`: which input field is wrong ("question", "options" or "answer"). */
  constructor(message: string, readonly field: string) {
    super(message);
    this.name = 'QuestionFormatError';
  }
}

const OPTION_LINE = /^\s*(?:[-*•]\s*)?[([]?([A-Z])[)\].:：]\s*(.*?)\s*$/;
const CANNOT_RE = /^(?:can ?not|cannot|can't) (?:be )?answer(?:ed)?\b/i;

function isCannotAnswer(text: string): boolean {
  return CANNOT_RE.test(text.trim());
}

/** Options from a list (["cat", "dog"] or ["A. cat", "B. dog"]) or a map ({"A": "cat", "B": "dog"}). */
function optionsFromField(v: unknown): string[] {
  if (Array.isArray(v)) {
    if (!v.every((x) => typeof x === 'string')) throw new QuestionFormatError('`options` must hold strings', 'options');
    const list = v as string[];
    // Strip "A. " style labels when every option carries the expected letter in order.
    const labelled = list.every((o, i) => {
      const m = OPTION_LINE.exec(o);
      return m !== null && m[1] === LETTERS[i];
    });
    return labelled ? list.map((o) => OPTION_LINE.exec(o)![2]!) : list.map((o) => o.trim());
  }
  if (typeof v === 'object' && v !== null) {
    const entries = Object.entries(v as Record<string, unknown>);
    const out: string[] = [];
    entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    entries.forEach(([k, text], i) => {
      if (k.trim().toUpperCase() !== LETTERS[i] || typeof text !== 'string') {
        throw new QuestionFormatError('`options` as an object must map the letters A, B, C, ... to strings', 'options');
      }
      out.push(text.trim());
    });
    return out;
  }
  throw new QuestionFormatError('`options` must be a list of strings or an object of letter -> text', 'options');
}

/** Splits a question text into its stem and its lettered option lines (A, B, C, ... in order). */
export function splitQuestionText(text: string): { stem: string; options: string[] } {
  const lines = text.split(/\r?\n/);
  const start = lines.findIndex((l) => OPTION_LINE.exec(l)?.[1] === 'A');
  if (start < 0) throw new QuestionFormatError('no lettered options (A) ..., B) ...) found in the question; give `options`', 'question');
  const options: string[] = [];
  for (let i = start; i < lines.length; i++) {
    const line = lines[i]!;
    if (line.trim() === '') continue;
    const m = OPTION_LINE.exec(line);
    if (m && m[1] === LETTERS[options.length]) {
      options.push(m[2]!);
    } else if (options.length > 0 && !m) {
      options[options.length - 1] += ` ${line.trim()}`; // an option text wrapped onto the next line
    } else {
      throw new QuestionFormatError(`unexpected line among the options: "${line.trim().slice(0, 60)}"`, 'question');
    }
  }
  return { stem: lines.slice(0, start).join('\n').trim(), options };
}

/**
 * A letter "C" (also "(C)", "C.", "C) text", "c"), or an option's exact text -> the index in
 * `raw`; -2 for a "can not answer" text that is not among the options.
 */
function answerRawIndex(answer: unknown, raw: string[]): number {
  if (typeof answer !== 'string' || answer.trim() === '') {
    throw new QuestionFormatError('`answer` must be a letter (or the text of an option)', 'answer');
  }
  const a = answer.trim();
  const m = /^[([]?([A-Za-z])[)\].:]?(?:\s.*)?$/s.exec(a);
  if (m && (m[1] === m[1]!.toUpperCase() || a.length === 1)) {
    const idx = LETTERS.indexOf(m[1]!.toUpperCase());
    if (idx < raw.length) return idx;
    if (a.length <= 4) throw new QuestionFormatError(`\`answer\` "${a}" is not one of the options A-${LETTERS[raw.length - 1]}`, 'answer');
  }
  const byText = raw.findIndex((o) => o.toLowerCase() === a.toLowerCase());
  if (byText >= 0) return byText;
  if (isCannotAnswer(a)) return -2;
  throw new QuestionFormatError(`\`answer\` "${a.slice(0, 40)}" is neither an option letter nor an option's text`, 'answer');
}

/** Reads {question, options?, answer} into a MultipleChoice; throws QuestionFormatError. */
export function parseQuestion(item: { question?: unknown; options?: unknown; answer?: unknown }): MultipleChoice {
  if (typeof item.question !== 'string' || item.question.trim() === '') {
    throw new QuestionFormatError('`question` must be a non-empty string', 'question');
  }
  let stem: string;
  let raw: string[];
  if (item.options !== undefined && item.options !== null) {
    stem = item.question.trim();
    raw = optionsFromField(item.options);
  } else {
    ({ stem, options: raw } = splitQuestionText(item.question));
  }
  const rawIdx = answerRawIndex(item.answer, raw);
  // A "can not answer" option in the input is dropped (it is added back, last, when rendering).
  const options = raw.filter((o) => !isCannotAnswer(o));
  const field = item.options !== undefined && item.options !== null ? 'options' : 'question';
  if (options.length < 2) throw new QuestionFormatError('a question needs at least two options', field);
  if (options.length + 1 > LETTERS.length) throw new QuestionFormatError(`at most ${LETTERS.length - 1} options are supported`, field);
  const answer = rawIdx === -2 || isCannotAnswer(raw[rawIdx]!) ? -1 : raw.slice(0, rawIdx).filter((o) => !isCannotAnswer(o)).length;
  return { stem, options, answer };
}

export interface RenderedQuestion {
  /** Stem and lettered options, "can not answer" last. */
  text: string;
  /** Letters in use, e.g. "ABCDE". */
  letters: string;
  /** The correct letter. */
  answer: string;
  /** The "can not answer" letter. */
  cannotAnswer: string;
}

export function renderQuestion(q: MultipleChoice): RenderedQuestion {
  const all = [...q.options, CANNOT_ANSWER];
  const lines = [q.stem, ...all.map((o, i) => `   - ${LETTERS[i]}) ${o}`)];
  const cannot = LETTERS[q.options.length]!;
  return {
    text: lines.join('\n'),
    letters: LETTERS.slice(0, all.length),
    answer: q.answer < 0 ? cannot : LETTERS[q.answer]!,
    cannotAnswer: cannot,
  };
}

/** The options in a seeded random order (Fisher-Yates); the same (seed, key) always gives the same order. */
export function shuffleQuestion(q: MultipleChoice, seed: number, key: string): MultipleChoice {
  const rng = new Xoshiro128(seed, `shuffle:${key}`);
  const order = q.options.map((_, i) => i);
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor((rng.nextU32() / 0x100000000) * (i + 1));
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  return { stem: q.stem, options: order.map((i) => q.options[i]!), answer: q.answer < 0 ? -1 : order.indexOf(q.answer) };
}

/** A 31-bit sampling seed for one (run seed, key). */
export function keyedSeed(seed: number, key: string): number {
  return new Xoshiro128(seed, `seed:${key}`).nextU32() & 0x7fffffff;
}

/**
 * The option letter an answer gives, or null. In order: a letter opening the answer ("C",
 * "(C) Black", "**C**."), a letter after "answer is" / "option" / "choice", a letter set off by
 * punctuation ("... is B."), an option's exact text. Only letters in `letters` count; an
 * opening "A" or "I" followed by a lowercase word is read as English, not as a choice.
 */
export function parseAnswerLetter(response: string, letters: string, optionTexts?: readonly string[]): string | null {
  const text = response.replace(/\*\*/g, '').trim();
  const valid = (c: string | undefined): c is string => c !== undefined && c.length === 1 && letters.includes(c);

  const start = /^[:\-–]?\s*[([]?([A-Z])(?:$|[)\].:,;!]|\s+(?![a-z]))/.exec(text);
  if (start && valid(start[1])) return start[1];

  const phrase = /(?:[Aa]nswer|[Oo]ption|[Cc]hoice)(?:\s+(?:is|would be|should be|will be))?\s*[:\-–]?\s*[([]?([A-Z])(?![A-Za-z])/g;
  for (let m = phrase.exec(text); m; m = phrase.exec(text)) if (valid(m[1])) return m[1];

  const setOff = /(?:^|[\s([])([A-Z])(?=[)\].:,;!]|\s*$)/g;
  for (let m = setOff.exec(text); m; m = setOff.exec(text)) if (valid(m[1])) return m[1];

  if (optionTexts) {
    const t = text.replace(/[.\s]+$/, '').toLowerCase();
    const i = optionTexts.findIndex((o) => o.toLowerCase() === t);
    if (i >= 0 && valid(LETTERS[i])) return LETTERS[i]!;
  }
  return null;
}

/** Fraction of true values (0 for none): an item's mean accuracy, and a caption's QA reward. */
export function meanAccuracy(correct: readonly boolean[]): number {
  return correct.length === 0 ? 0 : correct.filter(Boolean).length / correct.length;
}

/** 1 when any of the n samples is right (best-of-n), else 0. */
export function bestOfN(correct: readonly boolean[]): number {
  return correct.some(Boolean) ? 1 : 0;
}

export interface ScoreSummary {
  /** Items scored. */
  items: number;
  /** Mean over items of the item's accuracy over its samples (Prism's mean accuracy). */
  mean_accuracy: number;
  /** Mean over items of best-of-n. */
  best_of_n: number;
  /** Accuracy of sample k over all items (k = 0..n-1). */
  per_sample_accuracy: number[];
}

/** Prism's aggregate over items, each a list of per-sample correctness. */
export function summarizeScores(perItem: readonly (readonly boolean[])[]): ScoreSummary {
  const scored = perItem.filter((c) => c.length > 0);
  const n = scored.reduce((m, c) => Math.max(m, c.length), 0);
  const perSample = Array.from({ length: n }, (_, k) => {
    const col = scored.filter((c) => c.length > k).map((c) => c[k]!);
    return meanAccuracy(col);
  });
  const mean = (xs: number[]): number => (xs.length === 0 ? 0 : xs.reduce((a, b) => a + b, 0) / xs.length);
  return {
    items: scored.length,
    mean_accuracy: mean(scored.map(meanAccuracy)),
    best_of_n: mean(scored.map(bestOfN)),
    per_sample_accuracy: perSample,
  };
}
