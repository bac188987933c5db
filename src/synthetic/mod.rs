//! The synthetic energy-based experiments of Sections 3.5 and 4 (being built).
