import fs from 'node:fs';
import path from 'node:path';
import { REASONS } from '@sdmesh/common';
import { REPO_ROOT } from '../harness/paths';

/** Every .ts source of the services and packages (generated code left out). */
function sources(): Array<{ file: string; text: string }> {
  const out: Array<{ file: string; text: string }> = [];
  const walk = (dir: string) => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) {
        if (!['dist', 'gen', 'node_modules', 'build'].includes(e.name)) walk(p);
      } else if (e.name.endsWith('.ts')) out.push({ file: path.relative(REPO_ROOT, p), text: fs.readFileSync(p, 'utf8') });
    }
  };
  for (const top of ['services', 'packages']) {
    for (const pkg of fs.readdirSync(path.join(REPO_ROOT, top))) {
      const src = path.join(REPO_ROOT, top, pkg, 'src');
      if (fs.existsSync(src)) walk(src);
    }
  }
  return out;
}

describe('error reasons', () => {
  const files = sources();
  const table = new Set(Object.keys(REASONS));
  // The table and the error helpers' defaults (one generic reason per status code) name reasons as strings.
  const declaring = new Set(['packages/common/src/reasons.ts', 'packages/common/src/errors.ts']);

  it('no reason is written as a string literal outside the table: code says Reason.X', () => {
    const literals = files
      .filter((f) => !declaring.has(f.file))
      .flatMap((f) => [...f.text.matchAll(/'([A-Z][A-Z0-9_]{2,})'/g)].filter((m) => table.has(m[1]!)).map((m) => `${f.file}: '${m[1]}'`));
    expect(literals).toEqual([]);
  });

  it('every declared reason is produced or matched somewhere (no dead entries)', () => {
    const used = new Set(files.filter((f) => !declaring.has(f.file)).flatMap((f) => [...f.text.matchAll(/\bReason\.([A-Z][A-Z0-9_]+)/g)].map((m) => m[1]!)));
    const generic = new Set([...fs.readFileSync(path.join(REPO_ROOT, 'packages/common/src/errors.ts'), 'utf8').matchAll(/= '([A-Z_]+)'\)/g)].map((m) => m[1]!));
    expect([...table].filter((r) => !used.has(r) && !generic.has(r)).sort()).toEqual([]);
  });

  it('the API docs list every reason', () => {
    const docs = fs.readFileSync(path.join(REPO_ROOT, 'docs/api-errors.md'), 'utf8');
    expect([...table].filter((r) => !docs.includes(`\`${r}\``))).toEqual([]);
  });
});
