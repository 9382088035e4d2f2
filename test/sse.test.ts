// SSE framing: exact wire format of chunks, usage and [DONE], over a real HTTP connection.
import t from 'tap';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { ChatChunkBuilder, SSE_DONE, SseWriter, sseEvent } from '../src/entrypoints/openai/sse.js';

t.test('sseEvent frames one JSON payload per event', async (t) => {
  t.equal(sseEvent({ a: 1 }), 'data: {"a":1}\n\n');
  t.equal(sseEvent({ s: 'two\nlines\r\n' }), 'data: {"s":"two\\nlines\\r\\n"}\n\n', 'newlines stay escaped inside one data line');
  t.equal(SSE_DONE, 'data: [DONE]\n\n');
});

t.test('chunks follow OpenAI', async (t) => {
  const b = new ChatChunkBuilder('chatcmpl-1', 1700000000, 'caprl', false);
  t.same(b.role(), {
    id: 'chatcmpl-1', object: 'chat.completion.chunk', created: 1700000000, model: 'caprl',
    choices: [{ index: 0, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }],
  });
  t.same(b.content('Hel'), {
    id: 'chatcmpl-1', object: 'chat.completion.chunk', created: 1700000000, model: 'caprl',
    choices: [{ index: 0, delta: { content: 'Hel' }, logprobs: null, finish_reason: null }],
  });
  t.same(b.finish('length', null).choices, [{ index: 0, delta: {}, logprobs: null, finish_reason: 'length', stop_reason: null }]);
  t.notOk('usage' in b.content('x'), 'no usage field without include_usage');

  const u = new ChatChunkBuilder('chatcmpl-2', 1, 'caprl', true);
  t.equal(u.role().usage, null, 'usage: null on every chunk with include_usage');
  t.equal(u.content('x').usage, null);
  t.equal(u.finish('stop', 'END').usage, null);
  t.same(u.usage({ prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 }), {
    id: 'chatcmpl-2', object: 'chat.completion.chunk', created: 1, model: 'caprl', choices: [],
    usage: { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 },
  });
});

async function withServer(
  handler: (res: http.ServerResponse) => Promise<void>,
  fn: (port: number) => Promise<void>,
): Promise<void> {
  const server = http.createServer((_req, res) => void handler(res));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  try {
    await fn((server.address() as AddressInfo).port);
  } finally {
    server.closeAllConnections();
    await new Promise<void>((r) => server.close(() => r()));
  }
}

t.test('SseWriter: headers, events, [DONE] on the wire', async (t) => {
  const b = new ChatChunkBuilder('chatcmpl-w', 5, 'caprl', true);
  await withServer(async (res) => {
    const w = new SseWriter(res);
    w.start();
    await w.send(b.role());
    await w.send(b.content('héllo'));
    await w.send(b.finish('stop', null));
    await w.send(b.usage({ prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 }));
    await w.done();
  }, async (port) => {
    const r = await fetch(`http://127.0.0.1:${port}/`);
    t.equal(r.status, 200);
    t.equal(r.headers.get('content-type'), 'text/event-stream; charset=utf-8');
    t.equal(r.headers.get('cache-control'), 'no-cache');
    const body = await r.text();
    const events = body.split('\n\n');
    t.equal(events.pop(), '', 'ends with a blank line');
    t.equal(events.length, 5);
    t.ok(events.every((e) => e.startsWith('data: ') && !e.slice(6).includes('\n')), 'one data line per event');
    t.equal(events[4], 'data: [DONE]');
    const parsed = events.slice(0, 4).map((e) => JSON.parse(e.slice(6)));
    t.same(parsed.map((p) => p.choices[0]?.delta ?? null), [{ role: 'assistant', content: '' }, { content: 'héllo' }, {}, null]);
    t.same(parsed.map((p) => p.choices[0]?.finish_reason ?? null), [null, null, 'stop', null]);
    t.same(parsed[3].usage, { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 });
  });
});

t.test('SseWriter notices a client that went away', async (t) => {
  let sawClosed: boolean | undefined;
  let resolveDone!: () => void;
  const done = new Promise<void>((r) => (resolveDone = r));
  await withServer(async (res) => {
    const w = new SseWriter(res);
    w.start();
    await w.send(new ChatChunkBuilder('x', 1, 'm', false).role());
    // Keep writing until the client's disconnect is seen.
    const big = 'x'.repeat(64 * 1024);
    for (let i = 0; i < 10000; i++) {
      if (!(await w.write(`data: ${big}\n\n`))) break;
      await new Promise((r) => setTimeout(r, 1));
    }
    sawClosed = w.isClosed;
    w.end();
    resolveDone();
  }, async (port) => {
    const ac = new AbortController();
    const r = await fetch(`http://127.0.0.1:${port}/`, { signal: ac.signal });
    const reader = r.body!.getReader();
    await reader.read();
    ac.abort();
    await done;
  });
  t.equal(sawClosed, true, 'writes report false after the client disconnects');
});
