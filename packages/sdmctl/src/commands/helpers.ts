import type { Parsed } from '../args';
import { usageError } from '../exit';

export { parseSize } from '../args';

/** Usage error naming every required flag that is missing. */
export function usageErrorIfMissing(p: Parsed, names: string[]): void {
  const missing = names.filter((n) => p.flags[n] === undefined || p.flags[n] === '');
  if (missing.length) throw usageError(`missing ${missing.map((n) => `--${n}`).join(', ')} (see --help)`);
}
