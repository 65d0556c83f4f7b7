//! Platform-free HTTP decisions the Worker makes before any route runs: which CORS
//! headers a response carries, the request id, and which route a method and path name.

pub mod cors;
pub mod request_id;
pub mod routes;
