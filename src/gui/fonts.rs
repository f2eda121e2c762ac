//! CJK glyphs and symbols: egui's default fonts have neither. Use a system Noto CJK /
//! WenQuanYi font when there is one, and after it always the subset bundled in assets/fonts
//! (every non-ASCII character of our strings and icons), so an icon the system font lacks is
//! still drawn and a machine without fonts draws everything.

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

/// Install the CJK fonts after egui's defaults: with `system_fonts` a system font first (it has
/// every CJK character a dataset may hold), then the bundled subset. Returns where the first
/// CJK font came from.
pub fn install_cjk_font(ctx: &egui::Context, system_fonts: bool) -> String {
    let system = || SYSTEM_CJK_FONTS.iter().find_map(|p| std::fs::read(p).ok().map(|b| (b, p.to_string())));
    let system = system_fonts.then(system).flatten();
    let origin = system.as_ref().map_or("bundled subset".to_string(), |(_, path)| path.clone());
    ctx.set_fonts(definitions(system.map(|(bytes, _)| bytes)));
    origin
}

/// egui's default fonts, then `system_cjk` when there is one, then the bundled subset.
fn definitions(system_cjk: Option<Vec<u8>>) -> egui::FontDefinitions {
    let mut fonts = egui::FontDefinitions::default();
    let mut names = Vec::new();
    if let Some(bytes) = system_cjk {
        fonts.font_data.insert("cjk".into(), std::sync::Arc::new(egui::FontData::from_owned(bytes)));
        names.push("cjk");
    }
    fonts.font_data.insert("cjk-bundled".into(), std::sync::Arc::new(egui::FontData::from_static(BUNDLED_CJK)));
    names.push("cjk-bundled");
    // after the defaults: Latin text keeps egui's font, the rest falls through to these
    for family in [egui::FontFamily::Proportional, egui::FontFamily::Monospace] {
        fonts.families.entry(family).or_default().extend(names.iter().map(|n| n.to_string()));
    }
    fonts
}

#[cfg(test)]
mod tests {
    use eframe::egui;
    use skrifa::MetadataProvider;

    /// The texts the GUI draws that are not ASCII: its own sources (strings, icons such as ▶
    /// and ✕) and the sources of the messages it shows from elsewhere (the memory estimate's
    /// parts and suggestions, the trainer's notices).
    fn gui_characters() -> std::collections::BTreeSet<char> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let files: Vec<std::path::PathBuf> =
            std::fs::read_dir(root.join("src/gui")).unwrap().map(|e| e.unwrap().path()).collect();
        let mut chars = std::collections::BTreeSet::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            chars.extend(text.chars().filter(|c| !c.is_ascii() && !c.is_whitespace()));
        }
        // of the other sources, what their string literals hold (not their comments)
        for file in ["src/memory/estimate.rs", "src/memory/fit.rs", "src/train/trainer.rs"] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                let literals = line.split('"').skip(1).step_by(2);
                chars.extend(literals.flat_map(str::chars).filter(|c| !c.is_ascii() && !c.is_whitespace()));
            }
        }
        chars
    }

    /// Whether a font has `c` with an outline (a cmap entry for an empty glyph draws nothing).
    fn draws(font: &skrifa::FontRef<'_>, c: char) -> bool {
        use skrifa::outline::{DrawSettings, OutlinePen};
        struct Count(usize);
        impl OutlinePen for Count {
            fn move_to(&mut self, _: f32, _: f32) {}
            fn line_to(&mut self, _: f32, _: f32) {
                self.0 += 1;
            }
            fn quad_to(&mut self, _: f32, _: f32, _: f32, _: f32) {
                self.0 += 1;
            }
            fn curve_to(&mut self, _: f32, _: f32, _: f32, _: f32, _: f32, _: f32) {
                self.0 += 1;
            }
            fn close(&mut self) {}
        }
        let Some(glyph) = font.charmap().map(c) else { return false };
        let Some(outline) = font.outline_glyphs().get(glyph) else { return false };
        let mut pen = Count(0);
        let size = skrifa::instance::Size::unscaled();
        outline.draw(DrawSettings::unhinted(size, skrifa::instance::LocationRef::default()), &mut pen).is_ok()
            && pen.0 > 0
    }

    /// On a machine without system fonts every non-ASCII character of the GUI is drawn by a
    /// bundled font, in the order egui asks them: egui's own, then our subset. The first font
    /// that maps a character must draw it (egui does not look further).
    #[test]
    fn the_bundled_fonts_draw_every_character_of_the_gui() {
        let ctx = egui::Context::default();
        assert_eq!(super::install_cjk_font(&ctx, false), "bundled subset");
        let definitions = super::definitions(None);
        let mut chain: Vec<(String, &[u8])> = Vec::new();
        for family in [egui::FontFamily::Proportional, egui::FontFamily::Monospace] {
            for name in &definitions.families[&family] {
                chain.push((name.clone(), AsRef::<[u8]>::as_ref(&*definitions.font_data[name].font)));
            }
        }
        let fonts: Vec<(String, skrifa::FontRef<'_>)> =
            chain.iter().map(|(n, bytes)| (n.clone(), skrifa::FontRef::new(bytes).unwrap())).collect();
        let mut missing = Vec::new();
        for c in gui_characters() {
            match fonts.iter().find(|(_, f)| f.charmap().map(c).is_some()) {
                Some((name, font)) if !draws(font, c) => {
                    missing.push(format!("{c:?} (U+{:04X}): empty in {name}", c as u32))
                }
                Some(_) => {}
                None => missing.push(format!("{c:?} (U+{:04X}): in no bundled font", c as u32)),
            }
        }
        assert!(missing.is_empty(), "rebuild assets/fonts/cjk-subset.ttf with make-subset.sh: {missing:#?}");
        // the icons are among them
        let chars = gui_characters();
        assert!(chars.contains(&'▶') && chars.contains(&'✕'));
    }

    /// A system CJK font may lack an icon (▶, ✕): the bundled subset still follows it.
    #[test]
    fn the_bundled_subset_backs_a_system_font() {
        let defs = super::definitions(Some(super::BUNDLED_CJK.to_vec()));
        for family in [egui::FontFamily::Proportional, egui::FontFamily::Monospace] {
            let names = &defs.families[&family];
            assert_eq!(names[names.len() - 2..], ["cjk".to_string(), "cjk-bundled".to_string()], "{family:?}");
        }
    }
}
