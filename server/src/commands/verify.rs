//! `kappakv verify`.
