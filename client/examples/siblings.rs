//! Siblings and how to merge them.
//!
//! Two writers read the same version of a key and each writes over it. Neither saw the other,
//! so both values stay current: siblings, as writes on two nodes that had not seen each other
//! would be. A write with the context of a read that saw both supersedes both: merged.
//!
//! ```sh
//! cargo run -p kappakv-client --example siblings -- [TICKET]
//! ```

mod common;

use kappakv_client::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::connect(&common::ticket(1)?).await?;
    let key = "examples/siblings/color";

    client.put(key, "white").await?;
    let seen = client.get(key).await?;
    // Both writers replace exactly what they read.
    client.put_with(key, "red", &seen.context).await?;
    client.put_with(key, "blue", &seen.context).await?;

    let both = client.get(key).await?;
    let mut values: Vec<String> = both
        .values
        .iter()
        .map(|v| common::text(v.value.as_deref()))
        .collect();
    values.sort();
    println!("siblings: {}", values.join(", "));

    // The application decides what the merge is; the context makes it replace both.
    client.put_with(key, "purple", &both.context).await?;
    let merged = client.get(key).await?;
    let value = merged.value().map(|v| common::text(Some(v)));
    println!("merged: {}", value.unwrap_or_default());
    Ok(())
}
