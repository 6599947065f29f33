//! A structural validator for the subset of XML Schema `junit-10.xsd` uses:
//! global `xs:element`s with an inline `xs:complexType` (or a simple `type`),
//! child particles as `xs:element ref=` inside `xs:sequence`/`xs:choice`,
//! `minOccurs`/`maxOccurs`, `xs:attribute` with `use="required"`, `mixed`
//! content and `xs:pattern` restrictions on attribute types. Written here because
//! no maintained Rust crate validates XSD; it checks what the schema says about
//! element names, nesting, order of sequences, counts, attributes and text.

use std::collections::HashMap;

use roxmltree::{Document, Node};

const XS: &str = "http://www.w3.org/2001/XMLSchema";

#[derive(Debug, Clone)]
enum Particle {
    Element {
        name: String,
        min: usize,
        max: Option<usize>,
    },
    Sequence(Vec<Particle>, usize, Option<usize>),
    Choice(Vec<Particle>, usize, Option<usize>),
}

#[derive(Debug, Clone, Default)]
struct ElementDecl {
    attributes: Vec<(String, bool, Option<String>)>,
    content: Option<Particle>,
    mixed: bool,
    simple: bool,
}

/// A schema: its global elements and named simple types' patterns.
pub struct Schema {
    elements: HashMap<String, ElementDecl>,
    patterns: HashMap<String, String>,
}

fn occurs(n: Node, attr: &str, default: usize) -> Option<usize> {
    match n.attribute(attr) {
        Some("unbounded") => None,
        Some(v) => Some(v.parse().unwrap()),
        None => Some(default),
    }
}

fn particle(n: Node) -> Option<Particle> {
    let min = occurs(n, "minOccurs", 1).unwrap_or(0);
    let max = occurs(n, "maxOccurs", 1);
    let kids = || -> Vec<Particle> {
        n.children()
            .filter(|c| c.is_element())
            .filter_map(particle)
            .collect()
    };
    match n.tag_name().name() {
        "element" => Some(Particle::Element {
            name: n
                .attribute("ref")
                .or_else(|| n.attribute("name"))
                .unwrap()
                .to_string(),
            min,
            max,
        }),
        "sequence" => Some(Particle::Sequence(kids(), min, max)),
        "choice" => Some(Particle::Choice(kids(), min, max)),
        _ => None,
    }
}

impl Schema {
    /// Reads the schema's text.
    pub fn parse(text: &str) -> Schema {
        let doc = Document::parse(text).unwrap();
        let root = doc.root_element();
        assert_eq!(root.tag_name().namespace(), Some(XS));
        let mut complex_types: HashMap<String, Node> = HashMap::new();
        let mut patterns = HashMap::new();
        for n in root.children().filter(|n| n.is_element()) {
            let name = n.attribute("name").unwrap_or_default().to_string();
            match n.tag_name().name() {
                "complexType" => {
                    complex_types.insert(name, n);
                }
                "simpleType" => {
                    if let Some(p) = n.descendants().find(|d| d.has_tag_name((XS, "pattern"))) {
                        patterns.insert(name, p.attribute("value").unwrap().to_string());
                    }
                }
                _ => {}
            }
        }
        let decl_of = |ct: Node| -> ElementDecl {
            let mut d = ElementDecl {
                mixed: ct.attribute("mixed") == Some("true"),
                ..ElementDecl::default()
            };
            for c in ct.children().filter(|c| c.is_element()) {
                match c.tag_name().name() {
                    "attribute" => d.attributes.push((
                        c.attribute("name").unwrap().to_string(),
                        c.attribute("use") == Some("required"),
                        c.attribute("type").map(String::from),
                    )),
                    _ => d.content = particle(c),
                }
            }
            d
        };
        let mut elements = HashMap::new();
        for n in root.children().filter(|n| n.has_tag_name((XS, "element"))) {
            let name = n.attribute("name").unwrap().to_string();
            let decl = match (n.attribute("type"), n.children().find(|c| c.is_element())) {
                (Some(t), _) if t.starts_with("xs:") => ElementDecl {
                    simple: true,
                    ..ElementDecl::default()
                },
                (Some(t), _) => decl_of(complex_types[t]),
                (None, Some(ct)) => decl_of(ct),
                (None, None) => ElementDecl::default(),
            };
            elements.insert(name, decl);
        }
        Schema { elements, patterns }
    }

    /// Every violation of the schema in `xml`, one line each.
    pub fn validate(&self, xml: &str) -> Vec<String> {
        let mut errors = Vec::new();
        match Document::parse(xml) {
            Ok(doc) => self.element(doc.root_element(), &mut errors),
            Err(e) => errors.push(format!("not well-formed: {e}")),
        }
        errors
    }

    fn element(&self, n: Node, errors: &mut Vec<String>) {
        let name = n.tag_name().name();
        let Some(decl) = self.elements.get(name) else {
            errors.push(format!("<{name}> is not declared"));
            return;
        };
        for a in n.attributes() {
            match decl.attributes.iter().find(|(k, ..)| k == a.name()) {
                None => errors.push(format!("<{name}> has undeclared attribute {}", a.name())),
                Some((_, _, Some(t))) => {
                    if let Some(p) = self.patterns.get(t) {
                        let re = regex_lite::Regex::new(&format!("^(?:{p})$")).unwrap();
                        if !re.is_match(a.value()) {
                            errors.push(format!(
                                "<{name} {}={:?}> does not match {p}",
                                a.name(),
                                a.value()
                            ));
                        }
                    }
                }
                Some(_) => {}
            }
        }
        for (k, required, _) in &decl.attributes {
            if *required && n.attribute(k.as_str()).is_none() {
                errors.push(format!("<{name}> lacks required attribute {k}"));
            }
        }
        let kids: Vec<Node> = n.children().filter(|c| c.is_element()).collect();
        let has_text = n
            .children()
            .any(|c| c.is_text() && !c.text().unwrap_or("").trim().is_empty());
        if has_text && !decl.mixed && !decl.simple {
            errors.push(format!("<{name}> may not contain text"));
        }
        if decl.simple && !kids.is_empty() {
            errors.push(format!("<{name}> may contain only text"));
        }
        let names: Vec<&str> = kids.iter().map(|k| k.tag_name().name()).collect();
        let matched = match &decl.content {
            None => names.is_empty(),
            Some(p) => ends(p, &names, 0).contains(&names.len()),
        };
        if !matched && !decl.simple {
            errors.push(format!(
                "<{name}> children {names:?} do not match its content model"
            ));
        }
        for k in kids {
            self.element(k, errors);
        }
    }
}

/// Every position the particle can end at when matching from `at`.
fn ends(p: &Particle, names: &[&str], at: usize) -> Vec<usize> {
    let (min, max) = match p {
        Particle::Element { min, max, .. } => (*min, *max),
        Particle::Sequence(_, min, max) | Particle::Choice(_, min, max) => (*min, *max),
    };
    let once = |from: usize| -> Vec<usize> {
        match p {
            Particle::Element { name, .. } => {
                if names.get(from) == Some(&name.as_str()) {
                    vec![from + 1]
                } else {
                    vec![]
                }
            }
            Particle::Sequence(items, ..) => {
                let mut at = vec![from];
                for item in items {
                    let mut next: Vec<usize> =
                        at.iter().flat_map(|&a| ends(item, names, a)).collect();
                    next.sort_unstable();
                    next.dedup();
                    at = next;
                }
                at
            }
            Particle::Choice(items, ..) => {
                items.iter().flat_map(|i| ends(i, names, from)).collect()
            }
        }
    };
    let mut result = Vec::new();
    let mut frontier = vec![at];
    let mut count = 0;
    loop {
        if count >= min {
            result.extend(frontier.iter().copied());
        }
        if max.is_some_and(|m| count >= m) || frontier.is_empty() {
            break;
        }
        let mut next: Vec<usize> = frontier
            .iter()
            .flat_map(|&f| once(f))
            .filter(|&e| e > at + count || count < min)
            .collect();
        next.sort_unstable();
        next.dedup();
        // A repetition that consumes nothing cannot lead further.
        next.retain(|e| !frontier.contains(e) || count < min);
        frontier = next;
        count += 1;
        if count > names.len() + min + 1 {
            break;
        }
    }
    result.sort_unstable();
    result.dedup();
    result
}
