// The `caprl` command: subcommand dispatch. bin/caprl.js calls main(process.argv.slice(2)).
import { CliFatalError, CliUsageError } from './config/cli-args.js';

const USAGE = `usage: caprl <command> [options]

commands:
  serve            serve a model through the OpenAI-compatible API
                   (caprl serve internlm/CapRL-3B, a downloaded folder, or MODEL.gguf --mmproj MMPROJ.gguf)
  generate-model   write a random-weight GGUF model for tests and benchmarks
  caption          caption a folder, glob or JSONL list of images into a JSONL (resumable, shardable)
  run-batch        run a file of OpenAI batch requests (vLLM's run-batch format) in this process
  eval             Prism evaluation of a captioner (captions, then an answerer LLM's multiple-choice accuracy)

Run \`caprl <command> --help\` for a command's options.
`;

interface GenerateModule {
  runGenerateModel(argv: string[]): Promise<number>;
}

async function runGenerateModelCommand(argv: string[]): Promise<number> {
  // Loaded lazily (and through a variable, so the compiler does not require it to exist):
  // the generator is only needed by this subcommand.
  const specifier = './model/generate.js';
  let mod: GenerateModule;
  try {
    mod = (await import(specifier)) as GenerateModule;
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code === 'ERR_MODULE_NOT_FOUND' && String((err as Error).message).includes('generate.js')) {
      throw new Error('generate-model is not available in this build (dist/src/model/generate.js is missing)');
    }
    throw err;
  }
  if (typeof mod.runGenerateModel !== 'function') {
    throw new Error('generate-model is not available in this build (runGenerateModel is not exported)');
  }
  return mod.runGenerateModel(argv);
}

/** Subcommand -> its runner (exit code); each module is imported only when its command runs. */
const COMMANDS = new Map<string, (argv: string[]) => Promise<number>>([
  ['serve', async (a) => (await import('./entrypoints/openai/serve.js')).runServe(a)],
  ['generate-model', runGenerateModelCommand],
  ['caption', async (a) => (await import('./workflows/caption-cli.js')).runCaptionCommand(a)],
  ['run-batch', async (a) => (await import('./entrypoints/openai/run-batch.js')).runRunBatchCommand(a)],
  ['eval', async (a) => (await import('./workflows/prism-eval.js')).runEvalCommand(a)],
]);

export async function main(argv: string[]): Promise<void> {
  const [command, ...rest] = argv;
  try {
    const run = COMMANDS.get(command ?? '');
    if (run) {
      process.exitCode = await run(rest);
      return;
    }
    switch (command) {
      case undefined:
      case '-h':
      case '--help':
      case 'help':
        process.stdout.write(USAGE);
        process.exitCode = command === undefined ? 2 : 0;
        return;
      default:
        throw new CliUsageError(`unknown command "${command}"`);
    }
  } catch (err) {
    const named = COMMANDS.has(command ?? '');
    const prefix = named ? `caprl ${command}` : 'caprl';
    if (err instanceof CliFatalError) {
      process.stderr.write(`${prefix}: error: ${err.message}\n`);
      process.exitCode = 1;
      return;
    }
    if (err instanceof CliUsageError) {
      process.stderr.write(`${prefix}: error: ${err.message}\n`);
      process.stderr.write(named && command !== 'generate-model' ? `Run \`caprl ${command} --help\` for the options.\n` : USAGE);
      process.exitCode = 2;
      return;
    }
    throw err;
  }
}
