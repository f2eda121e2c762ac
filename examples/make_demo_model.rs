//! Writes the built-in demo model into assets/demo/model (see its README.md):
//! `cargo run --example make_demo_model`.

fn main() -> qlora_studio::Result<()> {
    let dir = qlora_studio::hub::demo::demo_model_dir();
    qlora_studio::hub::demo::write_demo_model(&dir)?;
    println!("wrote {}", dir.display());
    Ok(())
}
