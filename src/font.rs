//! The font of every figure of the workspace: DejaVu Sans, bundled (`assets/DejaVuSans.ttf`), so
//! that bitmap plots render text without fontconfig. Behind the `plot` feature (plotters).

use std::sync::Once;

use plotters::style::FontStyle;

/// The family name under which [`register_font`] registers the bundled DejaVu Sans.
pub const FONT: &str = "sans-serif";
static REGISTER: Once = Once::new();

/// Registers the bundled DejaVu Sans (`assets/DejaVuSans.ttf`) with plotters as [`FONT`], once per
/// process, so bitmap plots render text without fontconfig. Every plot of the workspace calls it.
pub fn register_font() {
    REGISTER.call_once(|| {
        // The bytes are a valid TrueType font shipped in the repository.
        let _ = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSans.ttf"),
        );
    });
}
