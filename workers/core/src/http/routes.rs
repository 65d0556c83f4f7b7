//! The one route table: every method and path the Worker serves, named by an
//! [`Endpoint`]. Dispatch and `405` with its `Allow` header read this table; the OpenAPI
//! document (`super::openapi`) is checked against it, so they cannot drift apart.

/// The HTTP methods routes use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }

    /// From a request's method name (`HEAD`, `OPTIONS` and others: None).
    pub fn parse(name: &str) -> Option<Method> {
        Some(match name.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            _ => return None,
        })
    }
}

/// Who may call a route (documentation and OpenAPI; each handler enforces its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Anyone,
    User,
    Admin,
    /// Signed by Twilio (`X-Twilio-Signature`).
    Twilio,
    /// Signed by Stripe (`Stripe-Signature`).
    Stripe,
    /// The media relay (`RELAY_SECRET`).
    Relay,
}

/// Every endpoint, one per row of [`ROUTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Health,
    /// `GET /openapi.json`: the OpenAPI 3.1 document of every route here.
    OpenApi,
    /// `GET /admin`: the operators' console, a static page (`crate::console`).
    Console,
    /// `GET /admin/assets/:file`: the console's script, style and images.
    ConsoleAsset,
    Register,
    Login,
    Logout,
    Me,
    MeUpdate,
    /// `GET /api/me/export`: everything the account holds, as one JSON document.
    MeExport,
    /// `DELETE /api/me`: the account's personal data erased.
    MeErase,
    PhoneStart,
    PhoneVerify,
    PersonaList,
    PersonaCreate,
    PersonaGet,
    PersonaUpdate,
    PersonaDelete,
    PersonaMemoryGet,
    PersonaMemoryDelete,
    CallTrigger,
    CallSchedule,
    CallHistory,
    CallDetail,
    CallCancel,
    ScheduleList,
    ScheduleCreate,
    ScheduleUpdate,
    ScheduleDelete,
    VoiceTwiml,
    VoiceStatus,
    VoiceStreamEnded,
    RelaySession,
    FavoriteList,
    FavoriteAdd,
    FavoriteRemove,
    Checkout,
    StripeWebhook,
    PaymentSuccessPage,
    PaymentCancelPage,
    AdminUsers,
    AdminUser,
    AdminBan,
    AdminUnban,
    AdminCredits,
    AdminCalls,
    AdminCall,
    AdminPersonas,
    AdminAudit,
    AnalyticsCalls,
    AnalyticsRevenue,
    AnalyticsCosts,
    /// `GET /admin/events`: the operators' event log, searched.
    AdminEvents,
    /// `POST /internal/relay/events`: the relay's warnings and errors, in batches.
    RelayEvents,
    /// `POST /mcp`: the Model Context Protocol server for operators' assistants.
    Mcp,
}

/// One row: `path` segments are literals or `:name` parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub endpoint: Endpoint,
    pub access: Access,
}

const fn r(method: Method, path: &'static str, endpoint: Endpoint, access: Access) -> Route {
    Route {
        method,
        path,
        endpoint,
        access,
    }
}

use Access::{Admin, Anyone, Relay, Stripe, Twilio, User};
use Endpoint as E;
use Method::{Delete, Get, Patch, Post, Put};

/// Every route of the Worker.
pub const ROUTES: &[Route] = &[
    r(Get, "/health", E::Health, Anyone),
    r(Get, "/openapi.json", E::OpenApi, Anyone),
    // The console's files are public; what they show needs an admin's token.
    r(Get, "/admin", E::Console, Anyone),
    r(Get, "/admin/assets/:file", E::ConsoleAsset, Anyone),
    r(Post, "/api/auth/register", E::Register, Anyone),
    r(Post, "/api/auth/login", E::Login, Anyone),
    r(Post, "/api/auth/logout", E::Logout, User),
    r(Get, "/api/me", E::Me, User),
    r(Patch, "/api/me", E::MeUpdate, User),
    r(Delete, "/api/me", E::MeErase, User),
    r(Get, "/api/me/export", E::MeExport, User),
    r(Post, "/api/me/phone", E::PhoneStart, User),
    r(Post, "/api/me/phone/verify", E::PhoneVerify, User),
    r(Get, "/api/personas", E::PersonaList, User),
    r(Post, "/api/personas", E::PersonaCreate, User),
    r(Get, "/api/personas/:id", E::PersonaGet, User),
    r(Put, "/api/personas/:id", E::PersonaUpdate, User),
    r(Delete, "/api/personas/:id", E::PersonaDelete, User),
    r(Get, "/api/personas/:id/memory", E::PersonaMemoryGet, User),
    r(
        Delete,
        "/api/personas/:id/memory",
        E::PersonaMemoryDelete,
        User,
    ),
    r(Post, "/api/calls/trigger", E::CallTrigger, User),
    r(Post, "/api/calls/schedule", E::CallSchedule, User),
    r(Get, "/api/calls/history", E::CallHistory, User),
    r(Get, "/api/calls/:id", E::CallDetail, User),
    r(Delete, "/api/calls/:id", E::CallCancel, User),
    r(Get, "/api/schedules", E::ScheduleList, User),
    r(Post, "/api/schedules", E::ScheduleCreate, User),
    r(Patch, "/api/schedules/:id", E::ScheduleUpdate, User),
    r(Delete, "/api/schedules/:id", E::ScheduleDelete, User),
    r(Post, "/api/voice/twiml", E::VoiceTwiml, Twilio),
    r(Post, "/api/voice/status", E::VoiceStatus, Twilio),
    r(Post, "/api/voice/stream-ended", E::VoiceStreamEnded, Twilio),
    r(Get, "/internal/calls/:id/session", E::RelaySession, Relay),
    r(Get, "/api/favorites", E::FavoriteList, User),
    r(Post, "/api/favorites", E::FavoriteAdd, User),
    r(Delete, "/api/favorites/:id", E::FavoriteRemove, User),
    r(Post, "/api/payments/checkout", E::Checkout, User),
    r(Post, "/api/payments/webhook", E::StripeWebhook, Stripe),
    r(Get, "/payments/success", E::PaymentSuccessPage, Anyone),
    r(Get, "/payments/cancel", E::PaymentCancelPage, Anyone),
    r(Get, "/admin/users", E::AdminUsers, Admin),
    r(Get, "/admin/users/:id", E::AdminUser, Admin),
    r(Post, "/admin/users/:id/ban", E::AdminBan, Admin),
    r(Post, "/admin/users/:id/unban", E::AdminUnban, Admin),
    r(Post, "/admin/users/:id/credits", E::AdminCredits, Admin),
    r(Get, "/admin/calls", E::AdminCalls, Admin),
    r(Get, "/admin/calls/:id", E::AdminCall, Admin),
    r(Get, "/admin/personas", E::AdminPersonas, Admin),
    r(Get, "/admin/audit", E::AdminAudit, Admin),
    r(Get, "/admin/analytics/calls", E::AnalyticsCalls, Admin),
    r(Get, "/admin/analytics/revenue", E::AnalyticsRevenue, Admin),
    r(Get, "/admin/analytics/costs", E::AnalyticsCosts, Admin),
    r(Get, "/admin/events", E::AdminEvents, Admin),
    r(Post, "/internal/relay/events", E::RelayEvents, Relay),
    r(Post, "/mcp", E::Mcp, Admin),
];

/// What a method and path name.
#[derive(Debug, PartialEq, Eq)]
pub enum Found<'p> {
    /// The route, with its `:name` parameters in path order.
    Route(&'static Route, Vec<&'p str>),
    /// The path exists with other methods: `allow` for the 405's header.
    WrongMethod {
        allow: String,
    },
    NotFound,
}

/// The parameters when `path`'s segments fit `pattern`'s.
fn fit<'p>(pattern: &str, path: &[&'p str]) -> Option<Vec<&'p str>> {
    let pat: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    if pat.len() != path.len() {
        return None;
    }
    let mut params = Vec::new();
    for (p, s) in pat.iter().zip(path) {
        if p.starts_with(':') {
            if s.is_empty() {
                return None;
            }
            params.push(*s);
        } else if p != s {
            return None;
        }
    }
    Some(params)
}

/// Looks `method` (None: one no route uses) and `path` up in `table`. A literal segment
/// wins over a parameter: `/api/calls/history` is never `/api/calls/:id`, whatever the
/// method.
pub fn find<'p>(table: &'static [Route], method: Option<Method>, path: &'p str) -> Found<'p> {
    // One leading and one trailing slash; an empty segment inside never matches.
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    let segments: Vec<&str> = trimmed.split('/').collect();
    let fitting: Vec<(&'static Route, Vec<&'p str>)> = table
        .iter()
        .filter_map(|route| fit(route.path, &segments).map(|p| (route, p)))
        .collect();
    // The most specific resource: the fewest parameters.
    let Some(fewest) = fitting.iter().map(|(_, p)| p.len()).min() else {
        return Found::NotFound;
    };
    let resource = fitting.into_iter().filter(|(_, p)| p.len() == fewest);
    let mut allow: Vec<Method> = Vec::new();
    for (route, params) in resource {
        if Some(route.method) == method {
            return Found::Route(route, params);
        }
        if !allow.contains(&route.method) {
            allow.push(route.method);
        }
    }
    allow.sort();
    let mut names: Vec<&str> = allow.iter().map(|m| m.as_str()).collect();
    names.push("OPTIONS");
    Found::WrongMethod {
        allow: names.join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(method: Method, path: &str) -> Option<(Endpoint, Vec<String>)> {
        match find(ROUTES, Some(method), path) {
            Found::Route(r, p) => Some((r.endpoint, p.iter().map(|s| s.to_string()).collect())),
            _ => None,
        }
    }

    #[test]
    fn every_row_is_distinct_and_well_formed() {
        for (i, a) in ROUTES.iter().enumerate() {
            assert!(a.path.starts_with('/'), "{}", a.path);
            for b in &ROUTES[i + 1..] {
                assert!(
                    !(a.method == b.method && a.path == b.path),
                    "{} {} twice",
                    a.method.as_str(),
                    a.path
                );
                assert_ne!(a.endpoint, b.endpoint, "one row per endpoint");
            }
        }
    }

    #[test]
    fn literals_win_over_parameters() {
        assert_eq!(
            endpoint(Get, "/api/calls/history"),
            Some((E::CallHistory, vec![]))
        );
        assert_eq!(
            endpoint(Get, "/api/calls/abc"),
            Some((E::CallDetail, vec!["abc".into()]))
        );
        assert_eq!(
            endpoint(Post, "/admin/users/u1/ban"),
            Some((E::AdminBan, vec!["u1".into()]))
        );
        assert_eq!(
            endpoint(Get, "/internal/calls/c1/session"),
            Some((E::RelaySession, vec!["c1".into()]))
        );
        // A trailing slash names the same resource.
        assert_eq!(endpoint(Get, "/api/me/"), Some((E::Me, vec![])));
    }

    #[test]
    fn wrong_method_lists_what_is_allowed() {
        assert_eq!(
            find(ROUTES, Some(Method::Patch), "/api/personas/p1"),
            Found::WrongMethod {
                allow: "GET, PUT, DELETE, OPTIONS".into()
            }
        );
        assert_eq!(
            find(ROUTES, None, "/api/calls/trigger"),
            Found::WrongMethod {
                allow: "POST, OPTIONS".into()
            }
        );
        // `/api/calls/history` is its own resource, not a call id.
        assert_eq!(
            find(ROUTES, Some(Delete), "/api/calls/history"),
            Found::WrongMethod {
                allow: "GET, OPTIONS".into()
            }
        );
    }

    #[test]
    fn unknown_paths_are_not_found() {
        for path in ["/api/nothing", "/api/personas/p1/extra", "/", "/api//x"] {
            assert_eq!(find(ROUTES, Some(Get), path), Found::NotFound, "{path}");
        }
        assert_eq!(find(ROUTES, Some(Get), "/api/personas//"), Found::NotFound);
    }

    /// The account's own data: export is its own resource under `/api/me`, erasure is
    /// `DELETE` on the account itself, and `/api/me` lists every method it takes.
    #[test]
    fn export_and_erasure_routes() {
        assert_eq!(endpoint(Get, "/api/me/export"), Some((E::MeExport, vec![])));
        assert_eq!(endpoint(Delete, "/api/me"), Some((E::MeErase, vec![])));
        assert_eq!(endpoint(Delete, "/api/me/"), Some((E::MeErase, vec![])));
        assert_eq!(
            find(ROUTES, Some(Post), "/api/me"),
            Found::WrongMethod {
                allow: "GET, PATCH, DELETE, OPTIONS".into()
            }
        );
        assert_eq!(
            find(ROUTES, Some(Delete), "/api/me/export"),
            Found::WrongMethod {
                allow: "GET, OPTIONS".into()
            }
        );
        for e in [E::MeExport, E::MeErase] {
            let row = ROUTES.iter().find(|r| r.endpoint == e).expect("a row");
            assert_eq!(row.access, Access::User, "{e:?}");
        }
    }

    #[test]
    fn methods_parse() {
        assert_eq!(Method::parse("patch"), Some(Method::Patch));
        assert_eq!(Method::parse("OPTIONS"), None);
        assert_eq!(Method::parse("HEAD"), None);
    }
}
