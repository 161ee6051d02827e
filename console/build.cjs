// Builds the console into dist/: one hashed JS bundle and one hashed CSS file (esbuild,
// minified), index.html naming them, a gzip copy of each (what the server sends to
// browsers that take gzip), and `stamp`, the hash of the sources (from ./x, which
// rebuilds when it changes). Run by `./x build` with NODE_PATH set to the packages that
// `npm ci` installed under target/console.
'use strict';
const fs = require('fs');
const path = require('path');
const zlib = require('zlib');
const esbuild = require('esbuild');

const root = __dirname;
const dist = path.join(root, 'dist');

async function main() {
  fs.rmSync(dist, { recursive: true, force: true });
  fs.mkdirSync(dist, { recursive: true });
  const result = await esbuild.build({
    entryPoints: { app: path.join(root, 'src/main.jsx') },
    bundle: true,
    minify: true,
    format: 'esm',
    target: ['es2020'],
    jsx: 'automatic',
    jsxImportSource: 'preact',
    nodePaths: (process.env.NODE_PATH || '').split(path.delimiter).filter(Boolean),
    entryNames: '[name]-[hash]',
    outdir: dist,
    metafile: true,
    legalComments: 'none',
    logLevel: 'warning',
  });
  const outputs = Object.keys(result.metafile.outputs).map((f) => path.basename(f));
  const js = outputs.find((f) => f.endsWith('.js'));
  const css = outputs.find((f) => f.endsWith('.css'));
  const html = fs
    .readFileSync(path.join(root, 'src/index.html'), 'utf8')
    .replace('%JS%', js)
    .replace('%CSS%', css);
  fs.writeFileSync(path.join(dist, 'index.html'), html);
  let total = 0;
  for (const name of fs.readdirSync(dist)) {
    const bytes = fs.readFileSync(path.join(dist, name));
    const gz = zlib.gzipSync(bytes, { level: 9 });
    fs.writeFileSync(path.join(dist, `${name}.gz`), gz);
    total += gz.length;
    console.log(`console: ${name} ${bytes.length} bytes, ${gz.length} gzipped`);
  }
  console.log(`console: ${total} bytes gzipped in all`);
  fs.writeFileSync(path.join(dist, 'stamp'), `${process.env.WASP_CONSOLE_STAMP || ''}\n`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
