#!/usr/bin/env node
// Thin launcher: the CLI is compiled from src/cli.ts into dist/ by the install step.
import('../dist/src/cli.js').then((m) => m.main(process.argv.slice(2))).catch((err) => {
  console.error(err?.stack ?? String(err));
  process.exit(1);
});
