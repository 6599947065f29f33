//! zc-images
