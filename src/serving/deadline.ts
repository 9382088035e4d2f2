// A request's deadline (--request-timeout): a signal that aborts, with the 504 error as its reason,
// when the request has run too long. The server's operations hooks set it on each generation
// request; handlers pass it (with their client's signal) to the engine and, when a generation ends
// aborted, answer with its reason (serving/generation.ts choiceFailure), in their own flow.
import type { FastifyRequest } from 'fastify';

const DEADLINE = Symbol('caprl.deadline');
const NEVER = new AbortController().signal;

type WithDeadline = FastifyRequest & { [DEADLINE]?: AbortSignal };

export function setRequestDeadline(request: FastifyRequest, signal: AbortSignal): void {
  (request as WithDeadline)[DEADLINE] = signal;
}

/** The request's deadline, or a signal that never aborts (no --request-timeout, or not a generation route). */
export function requestDeadline(request: FastifyRequest): AbortSignal {
  return (request as WithDeadline)[DEADLINE] ?? NEVER;
}
