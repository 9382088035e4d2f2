// Reading Prometheus text exposition in tests: samples, summed over the series that match.

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

export interface Scrape {
  text: string;
  samples: Sample[];
  /** # TYPE of each metric family. */
  types: Map<string, string>;
  /** Sum of the samples named `name` whose labels include `labels`; 0 when none. */
  value(name: string, labels?: Record<string, string>): number;
  /** Whether a sample of that name exists. */
  has(name: string): boolean;
  /** `le` bucket bounds of a histogram (first series), +Inf excluded. */
  buckets(name: string): number[];
}

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\d+)?$/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

export function parseProm(text: string): Scrape {
  const samples: Sample[] = [];
  const types = new Map<string, string>();
  for (const line of text.split('\n')) {
    if (line.startsWith('# TYPE ')) {
      const [, , name, type] = line.split(' ');
      types.set(name!, type!);
      continue;
    }
    if (line === '' || line.startsWith('#')) continue;
    const m = LINE.exec(line);
    if (!m) throw new Error(`unparseable metrics line: ${line}`);
    const labels: Record<string, string> = {};
    for (const l of (m[3] ?? '').matchAll(LABEL)) labels[l[1]!] = l[2]!;
    const raw = m[4]!;
    const value = raw === '+Inf' ? Infinity : raw === '-Inf' ? -Infinity : Number(raw);
    samples.push({ name: m[1]!, labels, value });
  }
  const matches = (s: Sample, labels: Record<string, string>) => Object.entries(labels).every(([k, v]) => s.labels[k] === v);
  return {
    text,
    samples,
    types,
    value(name, labels = {}) {
      return samples.filter((s) => s.name === name && matches(s, labels)).reduce((a, s) => a + s.value, 0);
    },
    has(name) {
      return samples.some((s) => s.name === name);
    },
    buckets(name) {
      const first = samples.find((s) => s.name === `${name}_bucket`);
      if (!first) return [];
      const series = (s: Sample) => Object.entries(first.labels).every(([k, v]) => k === 'le' || s.labels[k] === v);
      return samples
        .filter((s) => s.name === `${name}_bucket` && series(s) && s.labels.le !== '+Inf')
        .map((s) => Number(s.labels.le));
    },
  };
}

export async function scrape(baseUrl: string): Promise<Scrape> {
  const res = await fetch(`${baseUrl}/metrics`);
  if (res.status !== 200) throw new Error(`/metrics answered ${res.status}`);
  return parseProm(await res.text());
}
