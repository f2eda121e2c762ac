#!/bin/sh
# Rebuild cjk-subset.ttf: every non-ASCII character of src/gui/*.rs (the Chinese strings and
# symbols such as ▶ ✕ √ that egui's default fonts lack) and of the sources whose messages the
# GUI shows (the memory estimate and its suggestions, the trainer's notices), cut from
# WenQuanYi Micro Hei (Debian: fonts-wqy-microhei; Apache-2.0), with fonttools' pyftsubset.
# src/gui/fonts.rs tests that the subset draws every one of them.
set -e
cd "$(dirname "$0")"
python3 -c "import glob; t=''.join(open(f,encoding='utf-8').read() for f in glob.glob('../../src/gui/*.rs') + ['../../src/memory/estimate.rs', '../../src/memory/fit.rs', '../../src/train/trainer.rs']); print(''.join(sorted(set(c for c in t if ord(c)>0x7f and not c.isspace()))))" > chars.txt
pyftsubset /usr/share/fonts/truetype/wqy/wqy-microhei.ttc --font-number=0 --text-file=chars.txt \
  --output-file=cjk-subset.ttf --layout-features='*' --no-hinting
rm chars.txt
