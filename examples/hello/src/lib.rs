//! The smallest useful processor: greets whoever the request names. It is the quick
//! start's example and the benchmarks' trivial processor.

use serde::Deserialize;
use wasp_sdk::{Error, Processor, Request, Response};

struct Hello;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    name: String,
}

impl Processor for Hello {
    fn handle(request: Request) -> Result<Response, Error> {
        let input: Input = request.json()?;
        if input.name.is_empty() {
            return Err(Error::unprocessable("name must not be empty").with_field("name"));
        }
        let greeting = wasp_sdk::config::get("GREETING").unwrap_or_else(|| "hello".into());
        Ok(Response::json(&serde_json::json!({
            "greeting": format!("{greeting}, {}!", input.name),
        })))
    }
}

wasp_sdk::processor!(Hello);
