//! Reference Mamba-2 scan.
