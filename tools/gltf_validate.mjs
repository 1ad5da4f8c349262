// The Khronos glTF validator (npm gltf-validator) over GLB/glTF files: one JSON line per file on stdout
// ({path, errors, warnings, infos, hints, hasTextures, images, messages}); exit status 1 when any file has
// an error or cannot be read. Used by the tests and `make validate-glb`.
//   node tools/gltf_validate.mjs work/eval/meshes/*.glb
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";

const validator = createRequire(import.meta.url)("gltf-validator");

async function validate(path) {
  const bytes = new Uint8Array(await readFile(path));
  const report = await validator.validateBytes(bytes, { uri: path, maxIssues: 100 });
  const { numErrors, numWarnings, numInfos, numHints, messages } = report.issues;
  const images = (report.info?.resources ?? []).filter((r) => r.pointer?.startsWith("/images/"));
  return {
    path, errors: numErrors, warnings: numWarnings, infos: numInfos, hints: numHints,
    hasTextures: Boolean(report.info?.hasTextures), images: images.map((r) => ({ mimeType: r.mimeType, image: r.image })),
    triangles: report.info?.totalTriangleCount ?? 0,
    messages: messages.slice(0, 20).map((m) => `${["error", "warning", "info", "hint"][m.severity]} ${m.code} ${m.pointer ?? ""}: ${m.message}`),
  };
}

let failed = false;
for (const path of process.argv.slice(2)) {
  try {
    const r = await validate(path);
    failed ||= r.errors > 0;
    console.log(JSON.stringify(r));
  } catch (e) {
    failed = true;
    console.log(JSON.stringify({ path, errors: 1, messages: [`unreadable: ${e}`] }));
  }
}
process.exit(failed ? 1 : 0);
