"""Hand a jpeft adapter to torch users, checked with torch PEFT / transformers.

    python scripts/export_for_torch.py ADAPTER_DIR --base MODEL --out OUT_DIR [--merged]

Without ``--merged`` OUT_DIR is a PEFT adapter folder (``peft.PeftModel.from_pretrained``);
with it, a full transformers torch checkpoint with the adapter merged in
(``AutoModelForCausalLM.from_pretrained``). Either way the script loads the result in
torch and prints the largest logit difference from jpeft; it exits non-zero above 1e-4.
This is ``jpeft export``.
"""

import sys

from jpeft.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
