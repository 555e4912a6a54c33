//! `tokenproxy doctor`: placeholder.
pub async fn run(_config: &std::path::Path, _name: Option<&str>) -> u8 {
    0
}
