// `terraform fmt -check -recursive` and a syntax check of every .tf file
// under the given directories, without Terraform: HashiCorp's own HCL
// libraries compiled to WebAssembly (hclwrite.Format, which `terraform fmt`
// runs, from @cdktf/hcl-tools; the HCL parser from @cdktf/hcl2json).
// Run by scripts/terraform-check.sh, which installs them. `--fix` rewrites
// files in the canonical format instead of failing.
import { readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { createRequire } from "node:module";

const require = createRequire(process.env.CIRRUS_HCL_MODULES + "/");
const { format } = require("@cdktf/hcl-tools");
const { parse } = require("@cdktf/hcl2json");

const args = process.argv.slice(2);
const fix = args.includes("--fix");
const roots = args.filter((a) => a !== "--fix");

function tfFiles(dir) {
  const out = [];
  for (const name of readdirSync(dir).sort()) {
    const p = join(dir, name);
    if (name.startsWith(".")) continue;
    if (statSync(p).isDirectory()) out.push(...tfFiles(p));
    else if (name.endsWith(".tf")) out.push(p);
  }
  return out;
}

let bad = 0;
let n = 0;
for (const root of roots) {
  for (const file of tfFiles(root)) {
    n++;
    const text = readFileSync(file, "utf8");
    try {
      await parse(file, text);
    } catch (e) {
      console.error(`${file}: does not parse: ${e}`);
      bad++;
      continue;
    }
    const formatted = await format(text);
    if (formatted !== text) {
      if (fix) {
        writeFileSync(file, formatted);
        console.error(`${file}: reformatted`);
      } else {
        console.error(`${file}: not in canonical format (terraform fmt)`);
        bad++;
      }
    }
  }
}
if (n === 0) {
  console.error("no .tf files found");
  process.exit(1);
}
console.log(`${n} files checked, ${bad} with problems`);
process.exit(bad ? 1 : 0);
