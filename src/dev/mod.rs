//! Dev IdP and echo upstream (placeholder).
