//! Where we are willing to place a call (and send a verification SMS).
//!
//! Two fences, both checked here before anything reaches Twilio: the number's country
//! must be in `ALLOWED_COUNTRIES`, and the number must not be in a range that bills the
//! caller more than an ordinary line (premium rate, shared cost, personal numbering,
//! satellite and international networks) — the toll-fraud ranges. Twilio's own Geo
//! Permissions are the second fence, outside this code (README, "Deployment").
//!
//! The country is found from the E.164 prefix. The North American Numbering Plan
//! (`+1`) spans the US, Canada and about twenty Caribbean and Pacific countries and
//! territories, so for `+1` the three-digit area code decides; an area code not listed
//! as another country's is the US.

/// The allowed countries when `ALLOWED_COUNTRIES` is not set.
pub const DEFAULT_ALLOWED_COUNTRIES: &[&str] = &["US", "CA", "GB", "IE", "AU", "NZ"];

/// Calling codes we know, longest first where they share digits. `+1` is resolved by
/// [`nanp_country`]. A number whose code is not here has no country we can name, and is
/// refused.
const CALLING_CODES: &[(&str, &str)] = &[
    ("353", "IE"),
    ("354", "IS"),
    ("351", "PT"),
    ("352", "LU"),
    ("358", "FI"),
    ("420", "CZ"),
    ("972", "IL"),
    ("971", "AE"),
    ("852", "HK"),
    ("886", "TW"),
    ("234", "NG"),
    ("254", "KE"),
    ("27", "ZA"),
    ("30", "GR"),
    ("31", "NL"),
    ("32", "BE"),
    ("33", "FR"),
    ("34", "ES"),
    ("36", "HU"),
    ("39", "IT"),
    ("40", "RO"),
    ("41", "CH"),
    ("43", "AT"),
    ("44", "GB"),
    ("45", "DK"),
    ("46", "SE"),
    ("47", "NO"),
    ("48", "PL"),
    ("49", "DE"),
    ("52", "MX"),
    ("54", "AR"),
    ("55", "BR"),
    ("56", "CL"),
    ("57", "CO"),
    ("60", "MY"),
    ("61", "AU"),
    ("62", "ID"),
    ("63", "PH"),
    ("64", "NZ"),
    ("65", "SG"),
    ("66", "TH"),
    ("81", "JP"),
    ("82", "KR"),
    ("84", "VN"),
    ("86", "CN"),
    ("90", "TR"),
    ("91", "IN"),
    ("7", "RU"),
];

/// NANP area codes that are not the US mainland, with their country or territory.
const NANP_AREAS: &[(&str, &[&str])] = &[
    (
        "CA",
        &[
            "204", "226", "236", "249", "250", "257", "263", "289", "306", "343", "354", "365",
            "367", "368", "382", "403", "416", "418", "428", "431", "437", "438", "450", "460",
            "468", "474", "506", "514", "519", "548", "579", "581", "584", "587", "600", "604",
            "613", "622", "639", "647", "672", "683", "705", "709", "742", "753", "778", "780",
            "782", "807", "819", "825", "867", "873", "879", "902", "905", "942",
        ],
    ),
    ("BS", &["242"]),
    ("BB", &["246"]),
    ("AI", &["264"]),
    ("AG", &["268"]),
    ("VG", &["284"]),
    ("VI", &["340"]),
    ("KY", &["345"]),
    ("BM", &["441"]),
    ("GD", &["473"]),
    ("TC", &["649"]),
    ("JM", &["658", "876"]),
    ("MS", &["664"]),
    ("MP", &["670"]),
    ("GU", &["671"]),
    ("AS", &["684"]),
    ("SX", &["721"]),
    ("LC", &["758"]),
    ("DM", &["767"]),
    ("VC", &["784"]),
    ("PR", &["787", "939"]),
    ("DO", &["809", "829", "849"]),
    ("TT", &["868"]),
    ("KN", &["869"]),
];

/// Ranges refused in every country, as E.164 digit prefixes (without `+`), with why.
const REFUSED_RANGES: &[(&str, &str)] = &[
    // North America: premium-rate and pay-per-call services.
    ("1900", "premium-rate"),
    ("1976", "premium-rate"),
    // United Kingdom: premium rate (09), shared cost and revenue-share (084, 087),
    // directory enquiries (118), personal numbering often used in fraud (070).
    ("449", "premium-rate"),
    ("4484", "shared-cost"),
    ("4487", "shared-cost"),
    ("44118", "premium-rate"),
    ("4470", "personal numbering"),
    // Ireland: premium rate (15xx) and shared cost (18xx).
    ("35315", "premium-rate"),
    ("35318", "shared-cost"),
    // Australia: premium rate (190x).
    ("6119", "premium-rate"),
    // New Zealand: premium rate (0900).
    ("64900", "premium-rate"),
    // Global codes: satellite and international networks, international premium rate
    // and shared cost.
    ("870", "satellite"),
    ("881", "satellite"),
    ("882", "international network"),
    ("883", "international network"),
    ("979", "premium-rate"),
    ("808", "shared-cost"),
];

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The number's country is not allowed (`None`: no country we can name).
    Country(Option<&'static str>),
    /// The number is in a refused range (premium rate, satellite, …).
    Range(&'static str),
}

impl Refusal {
    /// A message for the caller.
    pub fn message(&self) -> String {
        match self {
            Refusal::Country(Some(c)) => {
                format!("We do not place calls to numbers in {c} yet.")
            }
            Refusal::Country(None) => "We cannot place calls to this number's country.".to_owned(),
            Refusal::Range(kind) => format!("We do not call {kind} numbers."),
        }
    }
}

/// The ISO 3166 alpha-2 country of an E.164 number (`+` and digits), if we know it.
pub fn country_of(e164: &str) -> Option<&'static str> {
    let digits = e164.strip_prefix('+').unwrap_or(e164);
    if let Some(national) = digits.strip_prefix('1') {
        return nanp_country(national);
    }
    CALLING_CODES
        .iter()
        .filter(|(code, _)| digits.starts_with(code))
        .max_by_key(|(code, _)| code.len())
        .map(|(_, country)| *country)
}

fn nanp_country(national: &str) -> Option<&'static str> {
    let area = national.get(..3)?;
    Some(
        NANP_AREAS
            .iter()
            .find(|(_, areas)| areas.contains(&area))
            .map_or("US", |(country, _)| *country),
    )
}

/// Whether we may call `e164` (already validated by `validate::e164`) with
/// `allowed` countries (upper-case ISO codes).
pub fn check(e164: &str, allowed: &[String]) -> Result<(), Refusal> {
    let digits = e164.strip_prefix('+').unwrap_or(e164);
    if let Some((_, kind)) = REFUSED_RANGES
        .iter()
        .find(|(prefix, _)| digits.starts_with(prefix))
    {
        return Err(Refusal::Range(kind));
    }
    match country_of(e164) {
        Some(c) if allowed.iter().any(|a| a == c) => Ok(()),
        other => Err(Refusal::Country(other)),
    }
}

/// Why a call cannot go to the number asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallRefusal {
    /// The number given is not a valid E.164 number.
    Invalid(crate::validate::ValidationError),
    /// The account has no verified phone, or asked for another number (`asked`).
    NotVerified { asked: bool },
    /// The verified number is outside the destination rules (they may have changed
    /// since it was verified).
    Destination(Refusal),
}

/// The number a call goes to: the account's verified phone, and only that. A number
/// given with the request must be that one (we call only the caller's own phone);
/// without one, the verified phone is used. Either way the destination rules apply
/// again, in case `ALLOWED_COUNTRIES` changed since the number was verified.
pub fn for_call(
    given: Option<&str>,
    verified: Option<&str>,
    allowed: &[String],
) -> Result<String, CallRefusal> {
    let given = given.map(str::trim).filter(|p| !p.is_empty());
    let asked = given
        .map(crate::validate::e164)
        .transpose()
        .map_err(CallRefusal::Invalid)?;
    let phone = match (asked, verified) {
        (Some(asked), Some(verified)) if asked == verified => asked,
        (None, Some(verified)) => verified.to_owned(),
        (asked, _) => {
            return Err(CallRefusal::NotVerified {
                asked: asked.is_some(),
            })
        }
    };
    check(&phone, allowed).map_err(CallRefusal::Destination)?;
    Ok(phone)
}

/// Parses one `ALLOWED_COUNTRIES` entry: a country we can recognise numbers of.
pub fn parse_country(entry: &str) -> Result<String, String> {
    let code = entry.trim().to_ascii_uppercase();
    let known = CALLING_CODES.iter().any(|(_, c)| *c == code)
        || NANP_AREAS.iter().any(|(c, _)| *c == code)
        || code == "US";
    if known {
        Ok(code)
    } else {
        Err(format!(
            "{entry:?} is not an ISO 3166 alpha-2 code of a country we can route"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Vec<String> {
        DEFAULT_ALLOWED_COUNTRIES
            .iter()
            .map(|c| (*c).to_owned())
            .collect()
    }

    /// The default countries' ordinary numbers are callable.
    #[test]
    fn ordinary_numbers_in_allowed_countries_pass() {
        for n in [
            "+14155550100",  // US, San Francisco
            "+16135550123",  // CA, Ottawa
            "+447911123456", // GB mobile
            "+442079460958", // GB London
            "+353871234567", // IE mobile
            "+61412345678",  // AU mobile
            "+6421123456",   // NZ mobile
        ] {
            assert_eq!(check(n, &defaults()), Ok(()), "{n}");
        }
    }

    /// `+1` is many countries: the area code decides, and the Caribbean is not the US.
    #[test]
    fn nanp_area_codes_name_their_country() {
        assert_eq!(country_of("+14155550100"), Some("US"));
        assert_eq!(country_of("+16135550123"), Some("CA"));
        assert_eq!(country_of("+18765550123"), Some("JM"));
        assert_eq!(country_of("+18095550123"), Some("DO"));
        assert_eq!(country_of("+17875550123"), Some("PR"));
        assert_eq!(
            check("+18765550123", &defaults()),
            Err(Refusal::Country(Some("JM")))
        );
    }

    /// The toll-fraud ranges are refused even in an allowed country.
    #[test]
    fn premium_and_satellite_ranges_are_refused() {
        for (n, kind) in [
            ("+19005550123", "premium-rate"),
            ("+19765550123", "premium-rate"),
            ("+449098790123", "premium-rate"),
            ("+448712345678", "shared-cost"),
            ("+448449876543", "shared-cost"),
            ("+44118118", "premium-rate"),
            ("+447012345678", "personal numbering"),
            ("+353151234567", "premium-rate"),
            ("+61190012345", "premium-rate"),
            ("+64900123456", "premium-rate"),
            ("+8816123456", "satellite"),
            ("+870773123456", "satellite"),
            ("+882161234567", "international network"),
            ("+88351001234", "international network"),
        ] {
            assert_eq!(check(n, &defaults()), Err(Refusal::Range(kind)), "{n}");
        }
    }

    /// A country outside the list is refused and named; an unknown code is refused too.
    #[test]
    fn other_countries_are_refused() {
        assert_eq!(
            check("+4930123456", &defaults()),
            Err(Refusal::Country(Some("DE")))
        );
        assert_eq!(
            check("+2250123456789", &defaults()),
            Err(Refusal::Country(None))
        );
        let with_de = vec!["DE".to_owned()];
        assert_eq!(check("+4930123456", &with_de), Ok(()));
        assert_eq!(
            check("+14155550100", &with_de),
            Err(Refusal::Country(Some("US")))
        );
    }

    /// The longest calling code wins (Ireland's 353 is not "35x").
    #[test]
    fn longest_calling_code_wins() {
        assert_eq!(country_of("+353871234567"), Some("IE"));
        assert_eq!(country_of("+351912345678"), Some("PT"));
        assert_eq!(country_of("+79161234567"), Some("RU"));
    }

    /// Configuration accepts known codes in any case and names the rest.
    #[test]
    fn country_entries_parse() {
        assert_eq!(parse_country(" gb "), Ok("GB".to_owned()));
        assert_eq!(parse_country("US"), Ok("US".to_owned()));
        assert_eq!(parse_country("JM"), Ok("JM".to_owned()));
        assert!(parse_country("XX").is_err());
        assert!(parse_country("USA").is_err());
    }

    /// Every refusal has a message for the caller.
    #[test]
    fn refusals_explain_themselves() {
        assert!(Refusal::Country(Some("DE")).message().contains("DE"));
        assert!(Refusal::Range("satellite").message().contains("satellite"));
        assert!(!Refusal::Country(None).message().is_empty());
    }

    /// Only the account's own verified number is called; a number given must be it, and
    /// the destination rules still apply to it.
    #[test]
    fn a_call_goes_only_to_the_verified_number() {
        let us = ["US".to_owned()];
        let verified = Some("+14155550100");
        assert_eq!(for_call(None, verified, &us), Ok("+14155550100".into()));
        assert_eq!(
            for_call(Some("  "), verified, &us),
            Ok("+14155550100".into())
        );
        assert_eq!(
            for_call(Some(" +1 415 555 0100 "), verified, &us),
            Ok("+14155550100".into())
        );
        assert_eq!(
            for_call(Some("+14155550199"), verified, &us),
            Err(CallRefusal::NotVerified { asked: true })
        );
        assert_eq!(
            for_call(None, None, &us),
            Err(CallRefusal::NotVerified { asked: false })
        );
        assert_eq!(
            for_call(Some("+14155550100"), None, &us),
            Err(CallRefusal::NotVerified { asked: true })
        );
        assert!(matches!(
            for_call(Some("call me"), verified, &us),
            Err(CallRefusal::Invalid(_))
        ));
        assert_eq!(
            for_call(None, verified, &["GB".to_owned()]),
            Err(CallRefusal::Destination(Refusal::Country(Some("US"))))
        );
    }
}
