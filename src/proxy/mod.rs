//! Listeners, router, header hygiene and forwarder (placeholder).
