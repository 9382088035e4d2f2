// A loopback HTTP server that serves images the way the Internet does and does not:
//   /img.png            the PNG given (content-length set)
//   /img-chunked.png    the same, chunked (no content-length)
//   /redirect/N         N redirects (302, relative Location), then /img.png
//   /loop               redirects to itself forever
//   /to-file            redirects to a file:// URL
//   /big                a declared content-length above any sane limit
//   /big-chunked        an endless chunked body (no content-length)
//   /slow               headers, then a body that never ends
//   /hang               never answers
//   /not-an-image       200 text/plain
//   /missing            404
import http from 'node:http';
import type { AddressInfo } from 'node:net';

export interface ImageServer {
  /** http://127.0.0.1:PORT */
  url: string;
  /** Requests seen, by path. */
  hits: string[];
  close(): Promise<void>;
}

export async function startImageServer(png: Buffer): Promise<ImageServer> {
  const hits: string[] = [];
  const open = new Set<http.ServerResponse>();
  const server = http.createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0]!;
    hits.push(path);
    open.add(res);
    res.on('close', () => open.delete(res));
    const redirect = /^\/redirect\/(\d+)$/.exec(path);
    if (path === '/img.png') {
      res.writeHead(200, { 'content-type': 'image/png', 'content-length': png.length });
      res.end(png);
    } else if (path === '/img-chunked.png') {
      res.writeHead(200, { 'content-type': 'image/png' });
      res.write(png.subarray(0, 10));
      res.end(png.subarray(10));
    } else if (redirect) {
      const left = Number(redirect[1]);
      res.writeHead(302, { location: left <= 1 ? '../img.png' : `/redirect/${left - 1}` });
      res.end();
    } else if (path === '/loop') {
      res.writeHead(301, { location: '/loop' });
      res.end();
    } else if (path === '/to-file') {
      res.writeHead(302, { location: 'file:///etc/passwd' });
      res.end();
    } else if (path === '/big') {
      res.writeHead(200, { 'content-type': 'image/png', 'content-length': 1024 * 1024 * 1024 });
      res.write(png);
      // never finishes: the client must stop reading on the declared size
    } else if (path === '/big-chunked') {
      res.writeHead(200, { 'content-type': 'image/png' });
      const chunk = Buffer.alloc(64 * 1024, 7);
      res.write(png);
      const pump = (): void => {
        while (!res.destroyed && res.write(chunk));
        if (!res.destroyed) res.once('drain', pump);
      };
      pump();
    } else if (path === '/slow') {
      res.writeHead(200, { 'content-type': 'image/png' });
      res.write(png.subarray(0, 8));
    } else if (path === '/hang') {
      // no answer at all
    } else if (path === '/not-an-image') {
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end('hello, this is text');
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found');
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    hits,
    async close() {
      for (const res of open) res.destroy();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
