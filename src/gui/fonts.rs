//! CJK glyphs: egui's default fonts have none. Use a system Noto CJK / WenQuanYi font when
//! there is one, else the subset bundled in assets/fonts (every character our Chinese
//! strings use).

use eframe::egui;

const SYSTEM_CJK_FONTS: &[&str] = &[
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJKsc-Regular.otf",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/wenquanyi/wqy-microhei/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "C:\\Windows\\Fonts\\msyh.ttc",
];

/// Bundled fallback: a subset of WenQuanYi Micro Hei (Apache-2.0) with our strings' characters.
const BUNDLED_CJK: &[u8] = include_bytes!("../../assets/fonts/cjk-subset.ttf");

/// Install a CJK font after egui's defaults; `system_first` looks for a system font before the
/// bundled subset. Returns where the font came from.
pub fn install_cjk_font(ctx: &egui::Context, system_first: bool) -> String {
    let system = || SYSTEM_CJK_FONTS.iter().find_map(|p| std::fs::read(p).ok().map(|b| (b, p.to_string())));
    let (bytes, origin) =
        system_first.then(system).flatten().unwrap_or_else(|| (BUNDLED_CJK.to_vec(), "bundled subset".to_string()));
    let mut fonts = egui::FontDefinitions::default();
    fonts.font_data.insert("cjk".into(), std::sync::Arc::new(egui::FontData::from_owned(bytes)));
    // after the defaults: Latin text keeps egui's font, CJK falls through to this one
    for family in [egui::FontFamily::Proportional, egui::FontFamily::Monospace] {
        fonts.families.entry(family).or_default().push("cjk".into());
    }
    ctx.set_fonts(fonts);
    origin
}

#[cfg(test)]
mod tests {
    use skrifa::MetadataProvider;

    /// Every non-ASCII character of the GUI's sources (the Chinese strings, symbols such as ▶)
    /// has a glyph in the bundled subset; a missing one makes egui panic on drawing it.
    /// After adding strings, rebuild the subset with assets/fonts/make-subset.sh.
    #[test]
    fn the_bundled_subset_draws_every_character_of_the_gui() {
        let font = skrifa::FontRef::new(super::BUNDLED_CJK).unwrap();
        let charmap = font.charmap();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gui");
        let mut missing = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            missing.extend(text.chars().filter(|&c| !c.is_ascii() && charmap.map(c).is_none()));
        }
        assert!(missing.is_empty(), "not in assets/fonts/cjk-subset.ttf (run make-subset.sh): {missing:?}");
    }
}
