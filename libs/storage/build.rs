//! `sqlx::migrate!` embeds the migrations when this crate compiles; this makes Cargo compile
//! it again when a migration is added or changed (the macro cannot say so itself on stable).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
