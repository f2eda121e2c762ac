#!/bin/sh
# Rebuild cjk-subset.ttf: the characters of src/gui/i18n.rs's Chinese strings, cut from
# WenQuanYi Micro Hei (Debian: fonts-wqy-microhei; Apache-2.0), with fonttools' pyftsubset.
set -e
cd "$(dirname "$0")"
python3 -c "import re,sys; t=open('../../src/gui/i18n.rs',encoding='utf-8').read(); print(''.join(sorted(set(c for c in t if ord(c)>0x2e80))))" > chars.txt
pyftsubset /usr/share/fonts/truetype/wqy/wqy-microhei.ttc --font-number=0 --text-file=chars.txt \
  --output-file=cjk-subset.ttf --layout-features='*' --no-hinting
rm chars.txt
