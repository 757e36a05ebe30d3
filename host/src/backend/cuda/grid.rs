//! The manifest's grid formulas (`"ceil(n/256)"`, `"(ceil(n/64), ceil(m/64), batches = outer *
//! inner)"`, `"rows"`, ...) evaluated from a launch's own arguments, so that every launch's grid
//! comes from the one table the kernels are documented in.
//!
//! Grammar: a component or a parenthesised list of up to three; a component may carry a label
//! (`parts = ...`); expressions use integers, `+ - * /`, parentheses, `ceil(...)`, and names. A
//! name is a parameter of the kernel or a value the caller supplies (`outer`, `max seg_len`).
//! Arithmetic is exact (rationals), so `ceil(batch*(n+1)*d/256)` is a true ceiling.
use anyhow::{anyhow, bail, ensure, Result};

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Num(u64),
    Name(String),
    Sym(char),
}

fn lex(s: &str) -> Result<Vec<Tok>> {
    let mut out = Vec::new();
    let c: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch.is_ascii_digit() {
            let st = i;
            while i < c.len() && c[i].is_ascii_digit() {
                i += 1;
            }
            let t: String = c[st..i].iter().collect();
            out.push(Tok::Num(t.parse()?));
        } else if ch.is_ascii_alphabetic() || ch == '_' {
            let st = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let name: String = c[st..i].iter().collect();
            // `max seg_len`: one name of two words.
            match (name.as_str(), out.last()) {
                (_, Some(Tok::Name(prev))) if prev == "max" => {
                    let joined = format!("max {name}");
                    out.pop();
                    out.push(Tok::Name(joined));
                }
                _ => out.push(Tok::Name(name)),
            }
        } else if "()+-*/,=".contains(ch) {
            out.push(Tok::Sym(ch));
            i += 1;
        } else {
            bail!("unexpected character '{ch}'");
        }
    }
    Ok(out)
}

/// A non-negative rational `n / d`, `d > 0`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Q(i128, i128);

fn gcd(a: i128, b: i128) -> i128 {
    if b == 0 {
        a.abs().max(1)
    } else {
        gcd(b, a % b)
    }
}

impl Q {
    fn new(n: i128, d: i128) -> Result<Q> {
        ensure!(d != 0, "division by zero");
        let g = gcd(n, d);
        let (n, d) = (n / g, d / g);
        Ok(if d < 0 { Q(-n, -d) } else { Q(n, d) })
    }
    fn ceil(self) -> Q {
        Q(
            self.0.div_euclid(self.1) + i128::from(self.0.rem_euclid(self.1) != 0),
            1,
        )
    }
}

struct Parser<'a> {
    t: &'a [Tok],
    i: usize,
    var: &'a dyn Fn(&str) -> Option<u64>,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.i)
    }
    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Sym(c)) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: char) -> Result<()> {
        ensure!(self.eat(c), "expected '{c}' at token {}", self.i);
        Ok(())
    }
    fn expr(&mut self) -> Result<Q> {
        let mut v = self.term()?;
        loop {
            if self.eat('+') {
                let r = self.term()?;
                v = Q::new(v.0 * r.1 + r.0 * v.1, v.1 * r.1)?;
            } else if self.eat('-') {
                let r = self.term()?;
                v = Q::new(v.0 * r.1 - r.0 * v.1, v.1 * r.1)?;
            } else {
                return Ok(v);
            }
        }
    }
    fn term(&mut self) -> Result<Q> {
        let mut v = self.factor()?;
        loop {
            if self.eat('*') {
                let r = self.factor()?;
                v = Q::new(v.0 * r.0, v.1 * r.1)?;
            } else if self.eat('/') {
                let r = self.factor()?;
                v = Q::new(v.0 * r.1, v.1 * r.0)?;
            } else {
                return Ok(v);
            }
        }
    }
    fn factor(&mut self) -> Result<Q> {
        match self.peek().cloned() {
            Some(Tok::Num(n)) => {
                self.i += 1;
                Ok(Q(n as i128, 1))
            }
            Some(Tok::Name(name)) if name == "ceil" => {
                self.i += 1;
                self.expect('(')?;
                let v = self.expr()?;
                self.expect(')')?;
                Ok(v.ceil())
            }
            Some(Tok::Name(name)) => {
                self.i += 1;
                let v = (self.var)(&name).ok_or_else(|| anyhow!("no value for '{name}'"))?;
                Ok(Q(v as i128, 1))
            }
            Some(Tok::Sym('(')) => {
                self.i += 1;
                let v = self.expr()?;
                self.expect(')')?;
                Ok(v)
            }
            other => bail!("unexpected {other:?} at token {}", self.i),
        }
    }
    /// One grid component, skipping a `label =`.
    fn component(&mut self) -> Result<Q> {
        if let (Some(Tok::Name(_)), Some(Tok::Sym('='))) =
            (self.t.get(self.i), self.t.get(self.i + 1))
        {
            self.i += 2;
        }
        self.expr()
    }
}

/// Evaluates one size expression (an extent such as `t_rows*k`) exactly: a non-negative
/// integer of any size (no wrap at 2^32 or 2^64 within i128).
pub fn eval_size(formula: &str, var: &dyn Fn(&str) -> Option<u64>) -> Result<u128> {
    let res = (|| {
        let toks = lex(formula)?;
        let mut p = Parser {
            t: &toks,
            i: 0,
            var,
        };
        let q = p.expr()?;
        ensure!(p.i == toks.len(), "trailing tokens");
        ensure!(q.1 == 1, "not an integer ({} / {})", q.0, q.1);
        u128::try_from(q.0).map_err(|_| anyhow!("negative ({})", q.0))
    })();
    res.map_err(|e: anyhow::Error| anyhow!("size '{formula}': {e}"))
}

/// Evaluates a grid formula; `var` gives the value of each name.
pub fn eval_grid(formula: &str, var: &dyn Fn(&str) -> Option<u64>) -> Result<[u32; 3]> {
    let toks = lex(formula).map_err(|e| anyhow!("grid '{formula}': {e}"))?;
    let mut p = Parser {
        t: &toks,
        i: 0,
        var,
    };
    let res = (|| {
        // A list `(a, b[, c])`: a '(' whose matching ')' ends the formula and that holds a
        // top-level comma.
        let mut depth = 0;
        let mut list = false;
        if toks.first() == Some(&Tok::Sym('(')) {
            for (j, t) in toks.iter().enumerate() {
                match t {
                    Tok::Sym('(') => depth += 1,
                    Tok::Sym(')') => {
                        depth -= 1;
                        if depth == 0 {
                            list = list && j + 1 == toks.len();
                            break;
                        }
                    }
                    Tok::Sym(',') if depth == 1 => list = true,
                    _ => {}
                }
            }
        }
        let mut comps = Vec::new();
        if list {
            p.expect('(')?;
            loop {
                comps.push(p.component()?);
                if !p.eat(',') {
                    break;
                }
            }
            p.expect(')')?;
        } else {
            comps.push(p.component()?);
        }
        ensure!(p.i == toks.len(), "trailing tokens");
        ensure!(comps.len() <= 3, "more than 3 grid dimensions");
        let mut g = [1u32; 3];
        for (o, q) in g.iter_mut().zip(&comps) {
            ensure!(q.1 == 1, "not an integer ({} / {})", q.0, q.1);
            *o = u32::try_from(q.0).map_err(|_| anyhow!("grid dimension {} out of range", q.0))?;
        }
        Ok(g)
    })();
    res.map_err(|e: anyhow::Error| anyhow!("grid '{formula}': {e}"))
}
