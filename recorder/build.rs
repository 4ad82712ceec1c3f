//! Rebuilds the recorder when a migration is added: `sqlx::migrate!` embeds
//! the migration files at compile time but does not watch the folder.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
