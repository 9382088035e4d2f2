// A small, table-driven command-line parser with vLLM's (argparse's) conventions:
//   --flag value, --flag=value, underscores and dashes interchangeable (--max_model_len),
//   booleans as --flag / --no-flag / --flag=false, list flags (nargs '+') take every value up to
//   the next flag, the last occurrence of a flag wins, "--" ends the flags, and an unknown flag
//   is an error that names it. Commands declare their flags in a FlagSpec table; adding a flag
//   is adding a row.

export type FlagType = 'string' | 'int' | 'float' | 'bool' | 'strings';

export interface FlagSpec {
  /** Canonical name without dashes, e.g. "max-model-len". */
  name: string;
  type: FlagType;
  /** Key in the parsed values object. */
  dest: string;
  help: string;
  metavar?: string;
  /** Other accepted names (without dashes), e.g. a short form "h". */
  aliases?: string[];
  /** Accepted values (string flags). */
  choices?: readonly string[];
}

export interface PositionalSpec {
  dest: string;
  help: string;
  metavar: string;
}

export interface CommandSpec {
  /** e.g. "caprl serve" */
  usage: string;
  summary: string;
  positionals: PositionalSpec[];
  flags: FlagSpec[];
}

export type ParsedValue = string | number | boolean | string[];

export interface ParsedArgs {
  /** Values of the flags and positionals that were given (absent keys were not given). */
  values: Record<string, ParsedValue>;
  help: boolean;
}

export class CliUsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CliUsageError';
  }
}

/** A command failed for a reason the user can act on (the message says it all; no stack trace). */
export class CliFatalError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'CliFatalError';
  }
}

/** "--Max_Model_Len" -> "max-model-len"; flags compare in this form. */
export function normalizeFlagName(raw: string): string {
  return raw.replace(/^-+/, '').replace(/_/g, '-');
}

function parseScalar(flag: FlagSpec, raw: string): ParsedValue {
  const shown = `--${flag.name}`;
  switch (flag.type) {
    case 'int': {
      if (!/^[+-]?\d+$/.test(raw.trim())) throw new CliUsageError(`argument ${shown}: invalid int value: '${raw}'`);
      const n = Number(raw);
      if (!Number.isSafeInteger(n)) throw new CliUsageError(`argument ${shown}: int value out of range: '${raw}'`);
      return n;
    }
    case 'float': {
      const n = Number(raw);
      if (raw.trim() === '' || !Number.isFinite(n)) throw new CliUsageError(`argument ${shown}: invalid float value: '${raw}'`);
      return n;
    }
    case 'bool': {
      const v = raw.trim().toLowerCase();
      if (['true', '1', 'yes', 'on'].includes(v)) return true;
      if (['false', '0', 'no', 'off'].includes(v)) return false;
      throw new CliUsageError(`argument ${shown}: invalid boolean value: '${raw}'`);
    }
    default:
      if (flag.choices && !flag.choices.includes(raw)) {
        throw new CliUsageError(
          `argument ${shown}: invalid choice: '${raw}' (choose from ${flag.choices.map((c) => `'${c}'`).join(', ')})`,
        );
      }
      return raw;
  }
}

function looksLikeFlag(arg: string): boolean {
  // "-5" or "-0.5" is a value, not a flag.
  return arg.startsWith('-') && arg !== '-' && !/^-\d/.test(arg);
}

export function parseArgs(spec: CommandSpec, argv: readonly string[]): ParsedArgs {
  const byName = new Map<string, FlagSpec>();
  for (const f of spec.flags) {
    byName.set(f.name, f);
    for (const a of f.aliases ?? []) byName.set(normalizeFlagName(a), f);
  }
  const values: Record<string, ParsedValue> = {};
  const positionals: string[] = [];
  let help = false;
  let flagsDone = false;

  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (flagsDone || !looksLikeFlag(arg)) {
      positionals.push(arg);
      continue;
    }
    if (arg === '--') {
      flagsDone = true;
      continue;
    }
    if (arg === '-h' || arg === '--help') {
      help = true;
      continue;
    }
    const eq = arg.indexOf('=');
    const rawName = eq >= 0 ? arg.slice(0, eq) : arg;
    const inlineValue = eq >= 0 ? arg.slice(eq + 1) : undefined;
    const name = normalizeFlagName(rawName);
    let flag = byName.get(name);
    if (!flag && name.startsWith('no-')) {
      const negated = byName.get(name.slice(3));
      if (negated?.type === 'bool') {
        if (inlineValue !== undefined) throw new CliUsageError(`argument ${rawName}: ignored explicit argument '${inlineValue}'`);
        values[negated.dest] = false;
        continue;
      }
    }
    if (!flag) throw new CliUsageError(`unrecognized argument: ${rawName}`);

    if (flag.type === 'bool') {
      values[flag.dest] = inlineValue === undefined ? true : parseScalar(flag, inlineValue);
      continue;
    }
    if (flag.type === 'strings') {
      const list: string[] = [];
      if (inlineValue !== undefined) list.push(inlineValue);
      else {
        while (i + 1 < argv.length && !looksLikeFlag(argv[i + 1]!)) list.push(argv[++i]!);
      }
      if (list.length === 0 || list.some((s) => s === '')) {
        throw new CliUsageError(`argument --${flag.name}: expected at least one value`);
      }
      values[flag.dest] = list;
      continue;
    }
    let raw = inlineValue;
    if (raw === undefined) {
      const next = argv[i + 1];
      if (next === undefined || looksLikeFlag(next)) {
        throw new CliUsageError(`argument --${flag.name}: expected a value`);
      }
      raw = next;
      i++;
    }
    values[flag.dest] = parseScalar(flag, raw);
  }

  if (positionals.length > spec.positionals.length) {
    const extra = positionals.slice(spec.positionals.length);
    throw new CliUsageError(`unrecognized argument${extra.length > 1 ? 's' : ''}: ${extra.join(' ')}`);
  }
  spec.positionals.forEach((p, k) => {
    if (positionals[k] !== undefined) values[p.dest] = positionals[k]!;
  });
  return { values, help };
}

/** parseArgs for a command's entry: on --help prints the help and returns null (the command then exits 0). */
export function parseArgsOrHelp(spec: CommandSpec, argv: readonly string[]): Record<string, ParsedValue> | null {
  const parsed = parseArgs(spec, argv);
  if (!parsed.help) return parsed.values;
  process.stdout.write(formatHelp(spec));
  return null;
}

// Typed reads of parsed values (absent, or of another type: undefined).

export function str(values: Record<string, ParsedValue>, key: string): string | undefined {
  const v = values[key];
  return typeof v === 'string' ? v : undefined;
}

/** A string flag the command cannot run without: missing or empty is a usage error with `message`. */
export function requireStr(values: Record<string, ParsedValue>, key: string, message: string): string {
  const v = str(values, key);
  if (!v) throw new CliUsageError(message);
  return v;
}

export function int(values: Record<string, ParsedValue>, key: string): number | undefined {
  const v = values[key];
  return typeof v === 'number' ? v : undefined;
}

export function strings(values: Record<string, ParsedValue>, key: string): string[] | undefined {
  const v = values[key];
  return Array.isArray(v) ? v : undefined;
}

export function positiveInt(values: Record<string, ParsedValue>, key: string, flag: string): number | undefined {
  const v = int(values, key);
  if (v !== undefined && v < 1) throw new CliUsageError(`argument --${flag}: must be at least 1, got ${v}`);
  return v;
}

/** argparse-like help text. */
export function formatHelp(spec: CommandSpec): string {
  const lines: string[] = [];
  const pos = spec.positionals.map((p) => `[${p.metavar}]`).join(' ');
  lines.push(`usage: ${spec.usage}${pos ? ` ${pos}` : ''} [options]`, '', spec.summary, '');
  if (spec.positionals.length > 0) {
    lines.push('positional arguments:');
    for (const p of spec.positionals) lines.push(`  ${p.metavar.padEnd(30)} ${p.help}`);
    lines.push('');
  }
  lines.push('options:');
  lines.push(`  ${'-h, --help'.padEnd(30)} show this help message and exit`);
  for (const f of spec.flags) {
    const meta = f.type === 'bool' ? '' : ` ${f.metavar ?? f.name.toUpperCase().replace(/-/g, '_')}${f.type === 'strings' ? ' [...]' : ''}`;
    const names = [`--${f.name}`, ...(f.aliases ?? []).map((a) => (a.length === 1 ? `-${a}` : `--${a}`))].join(', ');
    const left = `${names}${meta}`;
    const help = f.choices ? `${f.help} (one of: ${f.choices.join(', ')})` : f.help;
    if (left.length > 30) lines.push(`  ${left}`, `  ${''.padEnd(30)} ${help}`);
    else lines.push(`  ${left.padEnd(30)} ${help}`);
  }
  return `${lines.join('\n')}\n`;
}
