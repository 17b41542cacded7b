import { GrpcStatus, pb, SdmeshError } from '@sdmesh/common';
import type { Ctx } from './context';
import { EXIT, failed } from './exit';
import { bytes, duration, json, shortIds } from './output';
import { diskDetail, domainDetail, isTerminal, opId, statusName, stepsTable, typeName } from './render';

/**
 * Following an operation: a live view on a terminal (finished steps with the host that ran
 * them, and a progress bar with step, percent and MB/s for the running one), nothing while
 * it runs when stdout is not a terminal; then the result, and the exit code.
 */
export class ProgressView {
  private printed = new Set<string>();
  private lineOpen = false;
  private readonly started = Date.now();

  constructor(
    private readonly write: (text: string) => void,
    private readonly width = 24,
  ) {}

  private clearLine(): void {
    if (this.lineOpen) this.write('\r\x1b[2K');
    this.lineOpen = false;
  }

  update(op: pb.Operation): void {
    this.clearLine();
    for (const s of op.steps) {
      const key = `${s.name}#${s.attempt}`;
      if (!isTerminal(s.status) || this.printed.has(key)) continue;
      this.printed.add(key);
      this.write(stepLine(s) + '\n');
    }
    if (isTerminal(op.status)) return;
    const running = [...op.steps].reverse().find((s) => !isTerminal(s.status));
    const name = shortIds(running?.name || op.currentStep || statusName(op.status).toLowerCase());
    const p = running?.progress && (running.progress.percent > 0 || running.progress.bytesTotal > 0) ? running.progress : op.progress;
    const pct = Math.max(0, Math.min(100, p?.percent ?? 0));
    const filled = Math.round((pct / 100) * this.width);
    const bar = `[${'█'.repeat(filled)}${'░'.repeat(this.width - filled)}]`;
    const amount = p && p.bytesTotal > 0 ? `  ${bytes(p.bytesDone)} / ${bytes(p.bytesTotal)}` : '';
    const rate = p && p.mbps > 0 ? `  ${p.mbps.toFixed(1)} MB/s` : '';
    const where = running?.host ? ` on ${running.host}` : '';
    this.write(`  ▸ ${name}${where} ${bar} ${pct.toFixed(0).padStart(3)}%${amount}${rate}  ${duration(Date.now() - this.started)}`);
    this.lineOpen = true;
  }

  finish(): void {
    this.clearLine();
  }
}

export function stepLine(s: pb.OperationStep): string {
  const mark = s.status === pb.OperationStatus.OPERATION_STATUS_DONE ? '✓' : '✗';
  const took = s.startTime && s.endTime ? `  ${duration(s.endTime.getTime() - s.startTime.getTime())}` : '';
  const mb =
    s.progress && s.progress.bytesTotal > 0 ? `  ${bytes(s.progress.bytesTotal)}${s.progress.mbps > 0 ? ` at ${s.progress.mbps.toFixed(1)} MB/s` : ''}` : '';
  const err = s.error?.message ? `  ${s.error.message}` : '';
  return `  ${mark} ${shortIds(s.name)}${s.host ? ` on ${s.host}` : ''}${took}${mb}${err}`;
}

const sleep = (ms: number, signal: AbortSignal) =>
  new Promise<void>((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => (clearTimeout(t), resolve()), { once: true });
  });

/** Streams an operation until it ends (reconnecting through short scheduler outages). */
export async function watchUntilDone(ctx: Ctx, name: string, onChange: (op: pb.Operation) => void): Promise<pb.Operation | undefined> {
  let last: pb.Operation | undefined;
  let failures = 0;
  while (!ctx.signal.aborted) {
    try {
      for await (const op of ctx.api().ops.watchOperation({ name }, { signal: ctx.signal })) {
        failures = 0;
        last = op;
        onChange(op);
        if (isTerminal(op.status)) return op;
      }
      if (ctx.signal.aborted) return last;
      // The stream ended without a terminal state (a scheduler replica stopped): ask again.
      last = await ctx.api().ops.getOperation({ name }, ctx.call());
      onChange(last);
      if (isTerminal(last.status)) return last;
    } catch (err) {
      if (ctx.signal.aborted) return last;
      const e = SdmeshError.from(err);
      if (e.code !== GrpcStatus.UNAVAILABLE || ++failures > 20) throw e;
      await sleep(500, ctx.signal);
    }
  }
  return last;
}

export const INTERRUPTED = 130;

/**
 * Prints the end of an operation and returns the exit code: 0 DONE, 1 FAILED/ABORTED, 130 when
 * the user stopped waiting (the operation goes on).
 */
export function reportEnd(ctx: Ctx, op: pb.Operation | undefined, name: string, ok: pb.OperationStatus[] = [pb.OperationStatus.OPERATION_STATUS_DONE]): number {
  if (!op || !isTerminal(op.status)) {
    ctx.err.write(`sdmctl: stopped waiting; ${name} goes on (${op ? statusName(op.status) : 'state unknown'}). Follow it: sdmctl ops watch ${opId(name)}\n`);
    if (ctx.output === 'json' && op) ctx.out.write(json(pb.Operation.toJSON(op)));
    return INTERRUPTED;
  }
  if (ctx.output === 'json') {
    ctx.out.write(json(pb.Operation.toJSON(op)));
  } else {
    const took = op.createTime && op.updateTime ? ` in ${duration(op.updateTime.getTime() - op.createTime.getTime())}` : '';
    if (op.status === pb.OperationStatus.OPERATION_STATUS_DONE) {
      ctx.out.write(`${typeName(op.type)} done${took} (${op.name})\n`);
      if (!ctx.tty && op.steps.length) ctx.out.write(stepsTable(op.steps));
      if (op.result?.$case === 'disk') ctx.out.write('\n' + diskDetail(op.result.disk));
      if (op.result?.$case === 'storageDomain') ctx.out.write('\n' + domainDetail(op.result.storageDomain));
    } else {
      if (!ctx.tty && op.steps.length) ctx.out.write(stepsTable(op.steps));
      if (ok.includes(op.status)) ctx.out.write(`${typeName(op.type)} ${statusName(op.status)}${took} (${op.name})\n`);
    }
  }
  if (!ok.includes(op.status)) {
    const step = [...op.steps].reverse().find((s) => s.status === op.status || s.error);
    const where = step ? ` at step ${shortIds(step.name)}${step.host ? ` on ${step.host}` : ''}` : '';
    const why = op.error ? `: ${op.error.message}${op.error.reason ? ` [${op.error.reason}]` : ''}` : '';
    throw failed(`${typeName(op.type)} ${statusName(op.status)}${where}${why} (${op.name})`);
  }
  return EXIT.OK;
}

/** Follows an operation with the live view (on a terminal) and reports its end. */
export async function follow(ctx: Ctx, op: pb.Operation, ok?: pb.OperationStatus[]): Promise<number> {
  const view = ctx.tty && ctx.output === 'table' ? new ProgressView((t) => ctx.out.write(t)) : undefined;
  let final: pb.Operation | undefined = op;
  if (!isTerminal(op.status)) {
    view?.update(op);
    const timer = view ? setInterval(() => final && view.update(final), 1000) : undefined;
    try {
      final = (await watchUntilDone(ctx, op.name, (o) => ((final = o), view?.update(o)))) ?? final;
    } finally {
      if (timer) clearInterval(timer);
    }
  } else {
    view?.update(op);
  }
  view?.finish();
  return reportEnd(ctx, final, op.name, ok);
}
