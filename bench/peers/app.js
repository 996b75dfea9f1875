// The peer app of the benchmarks: the "dead simple" app of the article this project started from
// (a Node.js `cluster` tutorial), unchanged but for these two lines and per-process counters.
// Seed app + per-process counters (printed on SIGTERM). Listens on inherited fd 3 if LISTEN_FDS is set.
var n = 0, c = 0;
var server = require('http').createServer(function(req,res){n++;res.writeHead(200);res.end('this is dead simple');});
server.on('connection', function(){ c++; });
if (process.env.LISTEN_FDS) server.listen({fd: 3}); else server.listen(process.env.PORT || 8080);
process.on('SIGTERM', function(){ process.stderr.write('pid=' + process.pid + ' conns=' + c + ' reqs=' + n + '\n'); process.exit(0); });
